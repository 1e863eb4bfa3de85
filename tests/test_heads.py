"""attnzoo.heads: the OpenMMLab backbone wrapper and the configs under configs/.

Needs the OpenMMLab stack (mmengine, mmcv with its compiled ops, mmdet, mmseg); without it the
module is skipped. Installed but broken (e.g. mmcv without ops) is an error, not a skip.
The task-model tests build CSWin-T (and DiNAT-Mini) with one block per stage (same channels, a fraction
of the time).
"""
import re
import zipfile
from pathlib import Path
from urllib.error import URLError

import pytest

from mm_stack import skip_module_without_mm

skip_module_without_mm()

import numpy as np  # noqa: E402
import timm  # noqa: E402
import timm.optim  # noqa: E402
import torch  # noqa: E402
import mmcv.ops  # noqa: E402,F401  (fails loudly if mmcv was built without its ops)
from mmdet.registry import MODELS as DET_MODELS  # noqa: E402
from mmdet.structures import DetDataSample  # noqa: E402
from mmdet.structures.mask import BitmapMasks  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.registry import DefaultScope  # noqa: E402
from mmengine.structures import InstanceData, PixelData  # noqa: E402
from mmseg.registry import MODELS as SEG_MODELS  # noqa: E402
from mmseg.structures import SegDataSample  # noqa: E402

from attnzoo.backbones._checkpoint import CheckpointError  # noqa: E402
from attnzoo.heads import AttnzooBackbone, LayerDecayOptimWrapperConstructor  # noqa: E402  (registers them)
from official_checkpoints import cswin_official_state_dict, nat_official_state_dict, to_official_layout  # noqa: E402

pytestmark = pytest.mark.mm

CONFIG_DIR = Path(__file__).resolve().parents[1] / 'configs'
CONFIGS = sorted(CONFIG_DIR.rglob('*.py'))
REGISTRIES = {'mmdet': DET_MODELS, 'mmseg': SEG_MODELS}
SHALLOW = dict(depths=(1, 1, 1, 1))  # CSWin-T widths and heads, one block per stage
# DiNAT-Mini widths and heads (the same channels as CSWin-T), one block per stage; dilation 2 in the
# first two stages (at 64 x 64 the second stage's 8 x 8 map is padded to the 14 x 14 dilated window;
# the official dilations would pad every map to 56 x 56 at such sizes, a lot of CPU time)
DINAT_SHALLOW = dict(depths=(1, 1, 1, 1), dilations=((2,), (2,), (1,), (1,)))
NUM_ADE_CLASSES = 150


def config_path(prefix: str) -> Path:
    matches = [path for path in CONFIGS if path.name.startswith(prefix)]
    assert len(matches) == 1, f'expected one config starting with {prefix!r} under configs/, found {matches}'
    return matches[0]


def block_downloads(monkeypatch) -> None:
    """Every way timm fetches pretrained weights fails as it does offline, cached files or not."""
    import timm.models._builder as builder

    def offline(*args, **kwargs):
        raise URLError('[Errno -2] Name or service not known (downloads are blocked in the tests)')

    for name in ('load_state_dict_from_url', 'download_cached_file', 'load_state_dict_from_hf'):
        monkeypatch.setattr(builder, name, offline)


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch):
    """The configs as shipped (pretrained=True) build without a download: the weights load in init_weights()."""
    block_downloads(monkeypatch)


def load_config(path: Path, shallow: bool = False) -> Config:
    cfg = Config.fromfile(str(path))
    if shallow:
        cfg.model.backbone.update(SHALLOW)
    return cfg


def build_model(cfg: Config, device: str = 'cpu'):
    with torch.device(device), DefaultScope.overwrite_default_scope(cfg.default_scope):
        return REGISTRIES[cfg.default_scope].build(cfg.model)


def total_loss(model, losses) -> torch.Tensor:
    loss, _ = model.parse_losses(losses)
    assert torch.isfinite(loss), losses
    return loss


def backbone_grads(model):
    return [p.grad for p in model.backbone.parameters() if p.requires_grad]


# ---------------------------------------------------------------- registration and configs

def test_registered_in_mmdet_and_mmseg():
    assert DET_MODELS.get('AttnzooBackbone') is AttnzooBackbone
    assert SEG_MODELS.get('AttnzooBackbone') is AttnzooBackbone


def test_configs_exist():
    assert CONFIGS, f'no configs under {CONFIG_DIR}'


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: p.name)
def test_config_loads_and_builds(path):
    """Built on the meta device: the modules, their shapes and channels without filling ~90 models' weights
    (the task-model tests below run real weights)."""
    cfg = load_config(path)
    assert cfg.default_scope in REGISTRIES, f'{path.name}: default_scope {cfg.default_scope!r}'
    assert 'attnzoo.heads' in cfg.custom_imports['imports']
    model = build_model(cfg, device='meta')
    backbone = model.backbone
    assert isinstance(backbone, AttnzooBackbone)
    # what the backbone returns is what the next module was configured to take
    if 'neck' in cfg.model:
        assert list(backbone.out_channels) == list(cfg.model.neck.in_channels)
    else:
        assert list(backbone.out_channels) == list(cfg.model.decode_head.in_channels)
    if 'auxiliary_head' in cfg.model:
        aux = cfg.model.auxiliary_head
        assert backbone.out_channels[aux.in_index] == aux.in_channels
    optimizer = cfg.optim_wrapper.optimizer
    assert optimizer.type == 'AdamW'


# ---------------------------------------------------------------- detection

DET_SIZE = (128, 160)


def det_batch(with_masks: bool, seed: int = 0) -> dict:
    """Two uint8 images with two boxes each (masks: the boxes filled), as a dataloader yields them."""
    generator = torch.Generator().manual_seed(seed)
    h, w = DET_SIZE
    boxes = torch.tensor([[10., 20., 70., 90.], [60., 30., 150., 120.]])
    inputs, samples = [], []
    for _ in range(2):
        inputs.append(torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=generator))
        sample = DetDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w), scale_factor=(1., 1.)))
        gt = InstanceData(bboxes=boxes.clone(), labels=torch.tensor([1, 5]))
        if with_masks:
            masks = np.zeros((len(boxes), h, w), dtype=np.uint8)
            for i, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
                masks[i, y0:y1, x0:x1] = 1
            gt.masks = BitmapMasks(masks, h, w)
        sample.gt_instances = gt
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


def check_detections(results, with_masks: bool):
    h, w = DET_SIZE
    assert len(results) == 2
    for result in results:
        pred = result.pred_instances
        n = len(pred)
        assert pred.bboxes.shape == (n, 4) and pred.scores.shape == (n,) and pred.labels.shape == (n,)
        assert torch.isfinite(pred.bboxes).all()
        if n:
            assert (pred.bboxes[:, 0::2] >= 0).all() and (pred.bboxes[:, 0::2] <= w).all()
            assert (pred.bboxes[:, 1::2] >= 0).all() and (pred.bboxes[:, 1::2] <= h).all()
        if with_masks:
            assert tuple(pred.masks.shape) == (n, h, w)


@pytest.fixture(scope='module')
def mask_rcnn():
    torch.manual_seed(0)
    cfg = load_config(config_path('mask-rcnn_cswin'), shallow=True)
    # an untrained box head scores everything below the config's 0.05: keep the top ten, so the mask head runs
    cfg.model.test_cfg.rcnn.update(score_thr=0., max_per_img=10)
    return build_model(cfg)


def test_mask_rcnn_loss_backward(mask_rcnn):
    model = mask_rcnn.train()
    data = model.data_preprocessor(det_batch(with_masks=True), training=True)
    losses = model(**data, mode='loss')
    for name in ('loss_rpn_cls', 'loss_rpn_bbox', 'loss_cls', 'loss_bbox', 'loss_mask'):
        assert name in losses, sorted(losses)
    model.zero_grad()
    total_loss(model, losses).backward()
    grads = backbone_grads(model)
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_mask_rcnn_predict(mask_rcnn):
    model = mask_rcnn.eval()
    with torch.no_grad():
        data = model.data_preprocessor(det_batch(with_masks=False), training=False)
        results = model(**data, mode='predict')
    assert all(len(result.pred_instances) for result in results)
    check_detections(results, with_masks=True)


def test_retinanet_predict_and_loss():
    torch.manual_seed(0)
    model = build_model(load_config(config_path('retinanet_cswin'), shallow=True)).eval()
    with torch.no_grad():
        data = model.data_preprocessor(det_batch(with_masks=False), training=False)
        check_detections(model(**data, mode='predict'), with_masks=False)
        data = model.data_preprocessor(det_batch(with_masks=False), training=True)
        losses = model.train()(**data, mode='loss')
    assert {'loss_cls', 'loss_bbox'} <= set(losses)
    total_loss(model, losses)


@pytest.mark.slow
def test_dinat_backbone_in_a_detector_loss_backward():
    """A config's backbone swapped for DiNAT: loss and gradients through the dilated attention (the wrapper
    is the same for every family, so CI's budget leaves this out; the wrapper tests run DiNAT)."""
    torch.manual_seed(0)
    cfg = load_config(config_path('retinanet_cswin'))
    cfg.model.backbone = dict(type='AttnzooBackbone', model_name='dinat_mini', out_indices=(1, 2, 3), out_norm=True,
                              **DINAT_SHALLOW)
    model = build_model(cfg).train()
    assert model.backbone.features.model.stages[0].blocks[0].attn.dilation == 2
    data = model.data_preprocessor(det_batch(with_masks=False), training=True)
    total_loss(model, model(**data, mode='loss')).backward()
    for name, param in model.backbone.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, name


# ---------------------------------------------------------------- segmentation

SEG_SIZE = (128, 128)


def seg_batch(seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    h, w = SEG_SIZE
    inputs, samples = [], []
    for _ in range(2):
        inputs.append(torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=generator))
        sample = SegDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w)))
        sample.gt_sem_seg = PixelData(data=torch.randint(0, NUM_ADE_CLASSES, (1, h, w), generator=generator))
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


@pytest.mark.parametrize('prefix', ['upernet_cswin', 'fpn_cswin'])
def test_segmentor_loss_and_predict(prefix):
    torch.manual_seed(0)
    cfg = load_config(config_path(prefix), shallow=True)
    cfg.model.data_preprocessor.size = SEG_SIZE  # the configs pad to the 512x512 training crop
    model = build_model(cfg).train()
    data = model.data_preprocessor(seg_batch(), training=True)
    losses = model(**data, mode='loss')
    assert 'decode.loss_ce' in losses, sorted(losses)
    total_loss(model, losses).backward()
    assert all(g is not None and torch.isfinite(g).all() for g in backbone_grads(model))

    model.eval()
    with torch.no_grad():
        data = model.data_preprocessor(seg_batch(seed=1), training=False)
        results = model(**data, mode='predict')
    assert len(results) == 2
    for result in results:
        labels = result.pred_sem_seg.data
        assert tuple(labels.shape) == (1, *SEG_SIZE)
        assert labels.min() >= 0 and labels.max() < NUM_ADE_CLASSES


# ---------------------------------------------------------------- timm's own families

# CI's budget runs the segmentation configs (full-depth backbones); the detection ones, whose backbone and
# wrapper are the same, are slow
TIMM_NATIVE_CONFIGS = [
    pytest.param(path, id=path.name, marks=[pytest.mark.slow] if path.name.startswith('mask-rcnn') else [])
    for path in CONFIGS if path.parent.name in ('maxvit', 'davit', 'shvit', 'halonet')]


@pytest.mark.parametrize('path', TIMM_NATIVE_CONFIGS)
def test_timm_native_config_trains_a_step(path):
    """The configs of timm's MaxViT, DaViT, SHViT and HaloNet: the task's losses and gradients through the
    backbone, at sizes MaxViT and HaloNet reject as timm's models (padded by the wrapper)."""
    torch.manual_seed(0)
    cfg = load_config(path)
    if cfg.default_scope == 'mmseg':
        cfg.model.data_preprocessor.size = SEG_SIZE
        batch = seg_batch()
    else:
        batch = det_batch(with_masks=True)
    model = build_model(cfg).train()
    data = model.data_preprocessor(batch, training=True)
    losses = model(**data, mode='loss')
    assert ('decode.loss_ce' if cfg.default_scope == 'mmseg' else 'loss_mask') in losses, sorted(losses)
    total_loss(model, losses).backward()
    grads = backbone_grads(model)
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


# ---------------------------------------------------------------- layer-wise learning-rate decay

def upernet_with(model_name: str, out_indices, channels, **model_kwargs):
    cfg = load_config(config_path('upernet_cswin'))
    cfg.model.backbone = dict(type='AttnzooBackbone', model_name=model_name, out_indices=out_indices, out_norm=True,
                              **model_kwargs)
    cfg.model.decode_head.in_channels = list(channels)
    cfg.model.auxiliary_head.in_channels = channels[2]
    return build_model(cfg)


def layer_decay_groups(model, rate: float, **paramwise):
    constructor = LayerDecayOptimWrapperConstructor(
        dict(type='OptimWrapper', optimizer=dict(type='AdamW', lr=1e-3, weight_decay=0.05)),
        dict(layer_decay_rate=rate, **paramwise))
    names = {id(p): name for name, p in model.named_parameters()}
    return {names[id(group['params'][0])]: group for group in constructor(model).optimizer.param_groups}


def timm_lr_scales(model_name: str, rate: float, **model_kwargs) -> dict:
    """timm's own layer-wise decay of the classification model: parameter name -> learning-rate scale."""
    with torch.device('meta'):
        full = timm.create_model(model_name, **model_kwargs)
    names = {id(p): name for name, p in full.named_parameters()}
    groups = timm.optim.param_groups_layer_decay(full, layer_decay=rate)
    return {names[id(p)]: group['lr_scale'] for group in groups for p in group['params']}


@pytest.mark.parametrize('model_name, out_indices, channels, model_kwargs, to_full_name, paramwise', [
    # timm's getter wrapper keeps the model under features.model.
    ('cswin_tiny_224', (0, 1, 2, 3), (64, 128, 256, 512), SHALLOW, lambda n: n.removeprefix('features.model.'),
     dict(custom_keys={'norm': dict(decay_mult=0.)})),
    # timm's list wrapper flattens the first level: features.layer1_0.conv1 is layer1.0.conv1
    ('resnet18', (1, 2, 3, 4), (64, 128, 256, 512), {},
     lambda n: re.sub(r'^layer(\d)_(\d+)', r'layer\1.\2', n.removeprefix('features.')), {}),
])
def test_layer_decay_gives_timms_scales(model_name, out_indices, channels, model_kwargs, to_full_name, paramwise):
    """Backbone parameters learn at lr times timm's own layer-wise scale for the same parameter; the output
    norms, neck and heads at lr; mmengine's paramwise options still apply."""
    rate = 0.8
    model = upernet_with(model_name, out_indices, channels, **model_kwargs)
    groups = layer_decay_groups(model, rate, **paramwise)
    expected = timm_lr_scales(model_name, rate, **model_kwargs)
    backbone_scales = set()
    for name, group in groups.items():
        if name.startswith('backbone.features.'):
            scale = expected[to_full_name(name.removeprefix('backbone.'))]
            backbone_scales.add(round(scale, 12))
        else:
            scale = 1.
        assert group['lr'] == pytest.approx(1e-3 * scale), name
        if paramwise and 'norm' in name:
            assert group['weight_decay'] == 0., name
    # the stem and at least one block per stage, each at its own rate, none at the heads' rate
    assert len(backbone_scales) >= 5 and max(backbone_scales) < 1.


def test_layer_decay_errors():
    with pytest.raises(ValueError, match='layer_decay_rate must be a number in'):
        LayerDecayOptimWrapperConstructor(dict(type='OptimWrapper', optimizer=dict(type='AdamW', lr=1e-3)), {})
    cfg = load_config(config_path('upernet_cswin'))
    cfg.model.backbone = dict(type='ResNetV1c', depth=18)
    with pytest.raises(TypeError, match='not an AttnzooBackbone'):
        layer_decay_groups(build_model(cfg), 0.9)


# ---------------------------------------------------------------- the wrapper itself

def shallow_cswin(**kwargs) -> AttnzooBackbone:
    torch.manual_seed(0)
    return AttnzooBackbone('cswin_tiny_224', **SHALLOW, **kwargs)


@pytest.mark.parametrize('name, out_indices, model_kwargs', [
    ('cswin_tiny_224', (0, 1, 2, 3), SHALLOW),
    ('cswin_tiny_224', (1, 3), SHALLOW),
    ('dinat_mini', (0, 2), DINAT_SHALLOW),
    ('resnet18', (1, 2, 3, 4), {}),  # timm's own model, stride-2 stem at index 0
])
def test_outputs_match_timm_features(name, out_indices, model_kwargs):
    backbone = AttnzooBackbone(name, out_indices=out_indices, **model_kwargs).eval()
    reference = timm.create_model(name, features_only=True, out_indices=out_indices, **model_kwargs).eval()
    reference.load_state_dict(backbone.features.state_dict())
    assert backbone.out_channels == tuple(reference.feature_info.channels())
    assert backbone.out_strides == tuple(reference.feature_info.reduction())

    images = torch.randn(2, 3, 97, 75)  # odd sizes, not multiples of any stride
    with torch.no_grad():
        outputs = backbone(images)
        expected = reference(images)
    assert isinstance(outputs, tuple) and len(outputs) == len(out_indices)
    for out, ref, channels, stride in zip(outputs, expected, backbone.out_channels, backbone.out_strides):
        assert out.shape[:2] == (2, channels)
        for size, full in zip(out.shape[2:], images.shape[2:]):
            assert full // stride <= size <= -(-full // stride)
        torch.testing.assert_close(out, ref)


@pytest.mark.parametrize('name, out_indices, model_kwargs, multiple', [
    # 7 x 7 windows and grids on every stage map; the stride-32 stage sets the multiple (32 x 7)
    ('maxvit_tiny_tf_224', (1, 2, 3, 4), {}, (224, 224)),
    ('maxvit_tiny_tf_224', (1, 2), {}, (56, 56)),  # levels up to stride 8 only: timm drops the later stages
    # 8 x 8 blocks at stride 32 (and a stride-2 block at stride 16)
    ('halonet26t', (1, 2, 3, 4), {}, (256, 256)),
    ('cswin_tiny_224', (0, 1, 2, 3), SHALLOW, (1, 1)),  # pads inside its stripe attention itself
])
def test_input_multiple_of_partitioned_models(name, out_indices, model_kwargs, multiple):
    assert AttnzooBackbone(name, out_indices=out_indices, **model_kwargs).input_multiple == multiple


@pytest.fixture(scope='module', params=['maxvit_tiny_tf_224', 'halonet26t'])
def partitioned_backbone(request):
    torch.manual_seed(0)
    return AttnzooBackbone(request.param, out_indices=(1, 2, 3, 4)).eval()


# the size tests/test_models.py records timm's own MaxViT and HaloNet rejecting, and one they take as is
@pytest.mark.parametrize('size', [(230, 190), 'native'])
def test_sizes_timm_rejects_reach_maxvit_and_halonet(partitioned_backbone, size):
    """Padded to the model's input multiple and cropped back: each map is what timm's model gives for the
    zero-padded image, over the input's extent (``ceil(size / stride)``); a size the model takes natively is
    not padded."""
    backbone = partitioned_backbone
    size = backbone.input_multiple if size == 'native' else size
    images = torch.randn(1, 3, *size)
    padded_size = tuple(-(-s // m) * m for s, m in zip(size, backbone.input_multiple))
    padded = torch.zeros(1, 3, *padded_size)
    padded[..., :size[0], :size[1]] = images
    with torch.no_grad():
        outputs = backbone(images)
        expected = backbone.features(padded)
    for out, ref, stride in zip(outputs, expected, backbone.out_strides):
        assert out.shape[2:] == (-(-size[0] // stride), -(-size[1] // stride))
        torch.testing.assert_close(out, ref[..., :out.shape[2], :out.shape[3]])
        if padded_size == tuple(size):
            assert out.shape == ref.shape


def test_out_norm_normalises_channels():
    backbone = shallow_cswin(out_norm=True).eval()
    with torch.no_grad():
        outputs = backbone(torch.randn(1, 3, 64, 96))
    for out in outputs:  # freshly initialised LayerNorm: zero mean, unit variance over channels
        torch.testing.assert_close(out.mean(1), torch.zeros_like(out[:, 0]), atol=1e-4, rtol=0)
        torch.testing.assert_close(out.var(1, unbiased=False), torch.ones_like(out[:, 0]), atol=1e-2, rtol=0)


def pyramid_param_group(name: str) -> str:
    """'features.model.stages.1.blocks.0.norm1.weight' -> 'stages.1'; 'features.model.stem...' -> 'stem'."""
    parts = name.split('.')
    if parts[0] == 'out_norms':
        return f'out_norms.{parts[1]}'
    assert parts[:2] == ['features', 'model'], name
    return parts[2] if parts[2] == 'stem' else '.'.join(parts[2:4])


@pytest.mark.parametrize('name, model_kwargs, frozen_stages, frozen_groups', [
    ('cswin_tiny_224', SHALLOW, -1, set()),
    ('cswin_tiny_224', SHALLOW, 0, {'stem'}),
    ('cswin_tiny_224', SHALLOW, 2, {'stem', 'stages.0', 'stages.1', 'out_norms.0', 'out_norms.1'}),
    ('dinat_mini', DINAT_SHALLOW, 2, {'stem', 'stages.0', 'stages.1', 'out_norms.0', 'out_norms.1'}),
])
def test_frozen_stages(name, model_kwargs, frozen_stages, frozen_groups):
    torch.manual_seed(0)
    backbone = AttnzooBackbone(name, frozen_stages=frozen_stages, out_norm=True, **model_kwargs).train()
    groups = {pyramid_param_group(n): p.requires_grad for n, p in backbone.named_parameters()}
    assert {g for g, trainable in groups.items() if not trainable} == frozen_groups
    for module_name, module in backbone.named_modules():
        if module_name.startswith('features.model.'):
            assert module.training == (pyramid_param_group(module_name + '.x') not in frozen_groups), module_name

    sum(out.sum() for out in backbone(torch.randn(1, 3, 64, 64))).backward()
    for param_name, param in backbone.named_parameters():
        assert (param.grad is None) == (pyramid_param_group(param_name) in frozen_groups), param_name


def test_frozen_stages_and_norm_eval_resnet():
    # timm's list wrapper flattens the model: levels are act1 (stride 2), layer1 ... layer4
    backbone = AttnzooBackbone('resnet18', out_indices=(1, 2, 3, 4), frozen_stages=2).train()
    frozen = {n.split('.')[1] for n, p in backbone.named_parameters() if not p.requires_grad}
    assert frozen == {'conv1', 'bn1', 'layer1'}
    assert not backbone.features.bn1.training and not backbone.features.layer1.training
    assert backbone.features.layer2.training

    backbone = AttnzooBackbone('resnet18', out_indices=(1, 2, 3, 4), norm_eval=True).train()
    bns = [m for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(bn.training for bn in bns)
    running_mean = backbone.features.layer2[0].bn1.running_mean.clone()
    backbone(torch.randn(2, 3, 64, 64))
    torch.testing.assert_close(backbone.features.layer2[0].bn1.running_mean, running_mean)


def training_step_block_runs(backbone: AttnzooBackbone, images: torch.Tensor):
    """One training step (forward and backward): the outputs, the gradients, the number of transformer
    blocks and how many times they ran."""
    blocks = [m for name, m in backbone.named_modules() if re.fullmatch(r'.*stages\.\d+\.blocks\.\d+', name)]
    runs = []
    # pre-hooks: a checkpointed recomputation stops early, once it has what backward needs, so a
    # block's forward hook may never fire the second time
    hooks = [block.register_forward_pre_hook(lambda *_: runs.append(1)) for block in blocks]
    try:
        outputs = backbone(images)
        sum(out.square().mean() for out in outputs).backward()
    finally:
        for hook in hooks:
            hook.remove()
    return outputs, [p.grad for p in backbone.parameters()], len(blocks), len(runs)


@pytest.mark.parametrize('name, model_kwargs', [('cswin_tiny_224', SHALLOW), ('dinat_mini', DINAT_SHALLOW)])
def test_with_cp_recomputes_the_blocks_with_the_same_results(name, model_kwargs):
    """with_cp: the blocks run again in the backward pass (their activations were not kept), and the
    outputs and gradients are those of the plain backbone."""
    images = torch.randn(1, 3, 64, 64)
    results = []
    for with_cp in (False, True):
        torch.manual_seed(0)
        backbone = AttnzooBackbone(name, with_cp=with_cp, **model_kwargs).train()
        outputs, grads, num_blocks, runs = training_step_block_runs(backbone, images)
        assert num_blocks == 4 and runs == (2 if with_cp else 1) * num_blocks
        results.append((outputs, grads))
    (plain_out, plain_grads), (cp_out, cp_grads) = results
    for a, b in zip(plain_out, cp_out):
        torch.testing.assert_close(a, b)
    for a, b in zip(plain_grads, cp_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize('family, name, model_kwargs, official_keys', [
    ('cswin', 'cswin_tiny_224', SHALLOW, lambda: cswin_official_state_dict(64, (1, 1, 1, 1), device='meta')),
    ('nat', 'dinat_mini', DINAT_SHALLOW,
     lambda: nat_official_state_dict(64, (1, 1, 1, 1), (2, 4, 8, 16), mlp_ratio=3., layer_scale=None, device='meta')),
])
def test_official_checkpoint_loads_through_the_family_filter(tmp_path, family, name, model_kwargs, official_keys):
    """An official-layout file: CSWin's as its training script saves it (weights and EMA weights under
    DataParallel names: the EMA ones load, as timm prefers them), NAT's a plain state dict."""
    torch.manual_seed(1)
    wanted, other = (timm.create_model(name, **model_kwargs).state_dict() for _ in range(2))
    official = to_official_layout(family, wanted)
    assert official.keys() == official_keys().keys()
    if family == 'cswin':
        checkpoint = {'state_dict': {f'module.{k}': v for k, v in to_official_layout(family, other).items()},
                      'state_dict_ema': {f'module.{k}': v for k, v in official.items()}, 'epoch': 300}
    else:
        checkpoint = official
    path = tmp_path / 'official.pth'
    torch.save(checkpoint, path)
    backbone = AttnzooBackbone(name, checkpoint=str(path), **model_kwargs)
    backbone.init_weights()
    for key, value in backbone.features.model.state_dict().items():
        assert torch.equal(value, wanted[key]), key


def test_init_cfg_pretrained_loads_a_detector_checkpoint(tmp_path):
    trained = shallow_cswin(out_norm=True)
    path = tmp_path / 'detector.pth'
    torch.save({'state_dict': {f'backbone.{k}': v for k, v in trained.state_dict().items()}}, path)
    backbone = shallow_cswin(out_norm=True, init_cfg=dict(type='Pretrained', checkpoint=str(path), prefix='backbone.'))
    torch.manual_seed(5)
    for param in backbone.parameters():
        param.data.normal_()
    backbone.init_weights()
    for name, value in backbone.state_dict().items():
        torch.testing.assert_close(value, trained.state_dict()[name])


@pytest.mark.parametrize('kwargs, error, match', [
    (dict(model_name='cswin_tiny'), ValueError, "unknown model_name 'cswin_tiny'.*cswin_tiny_224"),
    (dict(model_name='cswin_tiny_224', out_indices=(0, 4)), ValueError, r'outside the feature levels.*stride 32'),
    (dict(model_name='resnet18', out_indices=(5,)), ValueError, r'outside the feature levels of resnet18'),
    (dict(model_name='cswin_tiny_224', out_indices=(2, 1)), ValueError, 'increasing'),
    (dict(model_name='cswin_tiny_224', out_indices=3), ValueError, 'sequence'),
    (dict(model_name='cswin_tiny_224', frozen_stages=5), ValueError, 'frozen_stages'),
    (dict(model_name='cswin_tiny_224', pretrained='x.pth'), TypeError, 'checkpoint='),
    (dict(model_name='cswin_tiny_224', checkpoint=3), TypeError, 'path of a file'),
    (dict(model_name='cswin_tiny_224', pretrained=True, init_cfg=dict(type='Pretrained', checkpoint='x')),
     ValueError, 'not both'),
    (dict(model_name='cswin_tiny_224', features_only=False), ValueError, 'set by the wrapper'),
])
def test_bad_arguments(kwargs, error, match):
    shallow = SHALLOW if kwargs['model_name'].startswith('cswin') else {}
    with pytest.raises(error, match=match):
        AttnzooBackbone(**shallow, **kwargs)


# ---------------------------------------------------------------- pretrained weights load in init_weights (issue 25)

def test_pretrained_weights_load_in_init_weights_and_a_failed_download_says_what_to_do(monkeypatch):
    """OpenMMLab's convention: a Runner's test builds the model and loads the trained checkpoint; only training
    calls init_weights(), which loads the pretrained weights."""
    backbone = shallow_cswin(pretrained=True)  # offline: no download tried
    with pytest.raises(RuntimeError, match=r"cannot download the pretrained weights of cswin_tiny_224 from https://github"
                                           r"\.com/microsoft/CSWin-Transformer/releases/download/v0\.1\.0/cswin_tiny_224\."
                                           r"pth \(URLError: .*\)\. .*pass it as a local file: checkpoint='/path/to/file"
                                           r"\.pth' with pretrained=False .*model\.backbone\.checkpoint"):
        backbone.init_weights()
    torch.manual_seed(3)
    wanted = AttnzooBackbone('cswin_tiny_224', **SHALLOW).state_dict()
    monkeypatch.setattr('timm.models._builder.load_pretrained', _load_as_timm(wanted))
    backbone = shallow_cswin(pretrained=True)
    assert not all(torch.equal(v, wanted[k]) for k, v in backbone.state_dict().items() if v.is_floating_point())
    backbone.init_weights()
    for key, value in backbone.state_dict().items():
        assert torch.equal(value, wanted[key]), key


def _load_as_timm(wanted):
    """Stands in for timm's load_pretrained (after a download): the weights of ``wanted`` (an AttnzooBackbone's)."""
    def load_pretrained(model, *args, **kwargs):
        model.load_state_dict({k.removeprefix('features.model.'): v for k, v in wanted.items()}, strict=False)
    return load_pretrained


def test_a_backbone_checkpoint_is_verified_when_the_weights_load(tmp_path):
    path = tmp_path / 'cswin.pth'
    torch.save({'state_dict_ema': {k: torch.randn(v.shape) for k, v in timm.create_model(
        'cswin_tiny_224', **SHALLOW).state_dict().items()}}, path)
    with zipfile.ZipFile(path) as archive:
        record = max(archive.infolist(), key=lambda r: r.file_size)
    data = bytearray(path.read_bytes())
    data[record.header_offset + 200:record.header_offset + 4296] = bytes(4096)  # zeroed: a hole in a download
    path.write_bytes(data)
    backbone = shallow_cswin(checkpoint=str(path))  # built without reading it
    with pytest.raises(CheckpointError, match=rf'cswin\.pth is damaged: the CRC-32 check fails for 1 of its \d+ zip '
                                              rf'records \({re.escape(record.filename)}\)'):
        backbone.init_weights()
    (tmp_path / 'empty.pth').touch()
    with pytest.raises(CheckpointError, match=r'empty\.pth is empty \(0 bytes\)'):
        shallow_cswin(checkpoint=str(tmp_path / 'empty.pth')).init_weights()
    with pytest.raises(FileNotFoundError, match='not a file'):
        shallow_cswin(checkpoint=str(tmp_path / 'missing.pth')).init_weights()
