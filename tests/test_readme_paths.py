"""A new user's paths through README.md, run as written: fine-tuning on an ImageFolder (the section's
commands, parsed out of its code block), the generated pretrained-weights table (and that each family does
what the table says), the OpenMMLab commands with local weights (the documented config overrides), and
which points of the zoo plot carry a name.
"""
import importlib.util
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import attnzoo.backbones  # noqa: F401  registers the attnzoo families
from mm_stack import needs_mm
from reference_params import OFFICIAL_PARAMS

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / 'tools'
README = ROOT / 'README.md'
sys.path.insert(0, str(TOOLS))
from benchlib import cards, zoo  # noqa: E402


def _load_tool(name):
    spec = importlib.util.spec_from_file_location(f'attnzoo_readme_{name}', TOOLS / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def readme_section(title):
    """The text of README's ``## title`` section (up to the next ``## `` heading)."""
    text = README.read_text()
    head = f'\n## {title}\n'
    assert head in text, f'README.md has no "## {title}" section'
    return text.split(head, 1)[1].split('\n## ', 1)[0]


def bash_commands(section):
    """The commands of a section's ```bash blocks as argument lists: continuation lines joined, comments and
    blank lines dropped."""
    commands = []
    for code in section.split('```bash\n')[1:]:
        code = code.split('```', 1)[0].replace('\\\n', ' ')
        for line in code.splitlines():
            line = line.split(' #', 1)[0].strip()
            if line and not line.startswith('#'):
                commands.append(shlex.split(line))
    return commands


def option(argv, name):
    return argv[argv.index(name) + 1]


# ---------------------------------------------------------------------------- fine-tune on your images

# what the test adds to each documented command (argparse: the last value wins) to make it tiny: a few
# steps on 32 x 32 images, on the CPU
TINY = {'tools/train.py': ['--img-size', '32', '--epochs', '1', '--max-steps-per-epoch', '2', '--batch-size', '4',
                           '--device', 'cpu'],
        'tools/eval.py': ['--batch-size', '8', '--device', 'cpu']}
CLASSES = ('cat', 'dog', 'fox')
IMAGES_PER_CLASS = {'train': 4, 'val': 2}


def fine_tune_commands():
    commands = bash_commands(readme_section('Fine-tune on your images'))
    assert commands and all(c[0] == 'python' and c[1].startswith('tools/') for c in commands), commands
    return {c[1]: c[2:] for c in commands}


def write_image_folder(root: Path):
    rng = np.random.default_rng(0)
    for split, count in IMAGES_PER_CLASS.items():
        for label in CLASSES:
            (root / split / label).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / label / f'{i:04d}.png')


@pytest.fixture(scope='module')
def fine_tuned(tmp_path_factory):
    """The section's train and eval commands, as written plus TINY, in a folder holding the ImageFolder and
    the pretrained file the commands name: the model with ImageNet's 1000 classes (another classifier)."""
    commands = fine_tune_commands()
    train_argv, eval_argv = commands['tools/train.py'], commands['tools/eval.py']
    work = tmp_path_factory.mktemp('fine_tune')
    write_image_folder(work / option(train_argv, '--dataset'))
    torch.manual_seed(123)
    pretrained = timm.create_model(option(train_argv, '--model'))
    assert pretrained.num_classes == 1000
    pretrained_file = work / option(train_argv, '--pretrained-file')
    save_file({k: v.contiguous() for k, v in pretrained.state_dict().items()}, str(pretrained_file))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as monkeypatch:
            monkeypatch.chdir(work)
            monkeypatch.setenv('HF_HUB_OFFLINE', '1')
            trained = _load_tool('train').main(train_argv + TINY['tools/train.py'])
            evaluated = _load_tool('eval').main(eval_argv + TINY['tools/eval.py'])
    finally:
        torch.set_num_threads(threads)
    return dict(commands=commands, work=work, pretrained=pretrained, trained=trained, evaluated=evaluated)


def test_fine_tune_commands_run_as_documented(fine_tuned):
    """The run starts from the pretrained file (every weight but the classifier), with a new classifier for
    the folder's classes, and the evaluation reads the run's checkpoint at the run's image size."""
    train_argv = fine_tuned['commands']['tools/train.py']
    run = fine_tuned['work'] / option(train_argv, '--output')
    checkpoint = fine_tuned['work'] / option(fine_tuned['commands']['tools/eval.py'], '--checkpoint')
    assert checkpoint.parent == run and checkpoint.is_file()
    weights = load_file(str(checkpoint))
    pretrained = fine_tuned['pretrained']
    classifier = pretrained.pretrained_cfg['classifier']
    assert weights[f'{classifier}.weight'].shape[0] == len(CLASSES)
    backbone = {k: v for k, v in pretrained.state_dict().items() if not k.startswith(classifier + '.')}
    assert backbone.keys() <= weights.keys()
    for key, value in backbone.items():
        if value.is_floating_point():
            # two warm-up steps from --warmup-lr 1e-6 move nothing far; a fresh initialisation would be far off
            torch.testing.assert_close(weights[key], value, atol=1e-3, rtol=0, msg=key)
    assert fine_tuned['trained']['epoch'] == 1
    evaluated = fine_tuned['evaluated']
    assert evaluated['num_images'] == len(CLASSES) * IMAGES_PER_CLASS['val']
    assert evaluated['input_size'] == [3, 32, 32]
    assert 0 <= evaluated['top1'] <= 100


def test_fine_tune_command_uses_layer_wise_decay(fine_tuned):
    """The documented --layer-decay reaches the optimizer: the classifier's group at the full rate, each
    layer below at the documented factor times the one above, over as many layers as the model has blocks."""
    train_argv = fine_tuned['commands']['tools/train.py']
    decay = float(option(train_argv, '--layer-decay'))
    state = json.loads((fine_tuned['work'] / option(train_argv, '--output') / 'train_state.json').read_text())
    scales = sorted({group['lr_scale'] for group in state['optimizer_param_groups']}, reverse=True)
    assert scales[0] == 1.0
    for above, below in zip(scales, scales[1:]):
        assert below == pytest.approx(above * decay)
    blocks = sum(1 for name, _ in fine_tuned['pretrained'].named_modules() if name.count('.') == 3
                 and name.split('.')[-2] == 'blocks')
    assert len(scales) >= blocks > 0


@pytest.mark.parametrize('decay', ['0', '1.5', '-0.75'])
def test_layer_decay_outside_0_1_is_refused(decay, capsys):
    train_tool = _load_tool('train')
    with pytest.raises(SystemExit):
        train_tool.resolve_args(train_tool.build_parser(), ['--model', 'nat_mini', '--layer-decay', decay])
    assert f'--layer-decay {float(decay)}: the decay per layer is in (0, 1]' in capsys.readouterr().err


def test_fine_tune_export_command(fine_tuned):
    export = TOOLS / 'export.py'
    argv = fine_tuned['commands']['tools/export.py']
    done = subprocess.run([sys.executable, str(export), *argv], cwd=fine_tuned['work'], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (fine_tuned['work'] / option(argv, '-o')).stat().st_size > 0


# ---------------------------------------------------------------------------- pretrained weights


def test_readme_weights_table_is_the_generated_one():
    text = README.read_text()
    assert cards.block(text, cards.WEIGHTS_TAG).strip() == cards.weights_table().strip(), \
        'README.md is stale: run `python tools/benchmark.py cards`'
    rows = [line.split('|')[1].strip() for line in cards.weights_table().splitlines()[2:] if line.startswith('|')]
    assert {fam.title for fam in zoo.FAMILIES} == set(rows)
    listed = cards.weights_table()
    for fam in zoo.FAMILIES:
        groups = [line for line in listed.splitlines() if line.startswith(f'| {fam.title} |')]
        named = sum(len(fam.variants) if '| all ' in line else line.split('|')[2].count('`') // 2 for line in groups)
        assert named == len(fam.variants), fam.title


class _Download(Exception):
    pass


def pretrained_true(name, monkeypatch):
    """What ``timm.create_model(name, pretrained=True)`` does, on the meta device, with timm's downloads
    replaced by a raise: ('url' | 'hub', None) where it would download, ('refused', message) where the family
    refuses first, ('none', None) where it loads nothing."""
    import timm.models._builder as builder

    def download(kind):
        def fetch(*args, **kwargs):
            raise _Download(kind)
        return fetch
    monkeypatch.setattr(builder, 'load_state_dict_from_url', download('url'))
    monkeypatch.setattr(builder, 'download_cached_file', download('url'))   # custom_load (BiFormer's file names)
    monkeypatch.setattr(builder, 'load_state_dict_from_hf', download('hub'))
    try:
        with torch.device('meta'):
            timm.create_model(name, pretrained=True)
    except _Download as reached:
        return str(reached), None
    except RuntimeError as refused:
        return ('none', None) if 'No pretrained weights exist' in str(refused) else ('refused', str(refused))
    return 'none', None


def _one_variant_per_source():
    """The smallest variant of each family and kind of source (the whole zoo runs under -m slow)."""
    chosen = {}
    for fam in zoo.FAMILIES:
        for name in sorted(fam.variant_names(), key=OFFICIAL_PARAMS.get):
            chosen.setdefault((fam.card, cards.weight_source(name)[0]), name)
    return sorted(chosen.values())


def _check_source(name, monkeypatch):
    kind, where = cards.weight_source(name)
    does, message = pretrained_true(name, monkeypatch)
    if kind in ('share-page', 'tensorflow'):
        assert does == 'refused', f'{name}: the table says {kind}, but pretrained=True tries to download ({does})'
        assert where.strip('`') in message and 'file' in message, message
        if kind == 'tensorflow':
            assert 'tools/convert.py' in message, message
    else:
        assert does == kind, f'{name}: the table says {kind}, pretrained=True does {does} ({message})'


@pytest.mark.parametrize('name', _one_variant_per_source())
def test_pretrained_true_does_what_the_table_says(name, monkeypatch):
    _check_source(name, monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize('name', [v.name for v in zoo.all_variants()])
def test_pretrained_true_does_what_the_table_says_for_every_variant(name, monkeypatch):
    _check_source(name, monkeypatch)


# ---------------------------------------------------------------------------- OpenMMLab with local weights


def mm_commands():
    """The commands of README's OpenMMLab section as {(tool, 'resume' or ''): arguments}, the config path
    made absolute (the tests run in a scratch folder, where the relative files the commands name are made)."""
    commands = {}
    for command in bash_commands(readme_section('Detection and segmentation (OpenMMLab)')):
        assert command[0] == 'python' and command[1] in ('tools/mm_train.py', 'tools/mm_test.py'), command
        argv = [str(ROOT / command[2])] + command[3:]
        commands[command[1], 'resume' if '--resume' in argv else ''] = argv
    assert set(commands) == {('tools/mm_train.py', ''), ('tools/mm_test.py', ''), ('tools/mm_train.py', 'resume')}
    return commands


def _prepare(tool, argv):
    module = _load_tool(tool)
    return module.prepare_config(module.build_parser().parse_args(argv))


def _cfg_option(argv, key):
    return next(item.split('=', 1)[1] for item in argv if item.startswith(key + '='))


def _build(model_cfg, scope, device):
    from mmengine.registry import DefaultScope
    registry = importlib.import_module(f'{scope}.registry').MODELS
    with torch.device(device), DefaultScope.overwrite_default_scope(scope):
        return registry.build(model_cfg)


@pytest.fixture
def forbid_downloads(monkeypatch):
    """timm's downloads raise instead of reaching the network."""
    import timm.models._builder as builder

    def download(*args, **kwargs):
        raise _Download('a pretrained download')
    for name in ('load_state_dict_from_url', 'download_cached_file', 'load_state_dict_from_hf'):
        monkeypatch.setattr(builder, name, download)


@pytest.fixture
def official_backbone_file(tmp_path, monkeypatch):
    """In a scratch folder: the backbone file the README's training command names, written as the official
    release lays out nat_mini's weights; returns our state dict of those weights."""
    from official_checkpoints import to_official_layout
    argv = mm_commands()['tools/mm_train.py', '']
    model_name = 'nat_mini'
    assert f"model_name='{model_name}'" in Path(argv[0]).read_text()
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(7)
    weights = timm.create_model(model_name).state_dict()
    path = Path(_cfg_option(argv, 'model.backbone.checkpoint'))
    path.parent.mkdir(parents=True)
    torch.save(to_official_layout('nat', weights), path)
    return weights


@needs_mm
@pytest.mark.mm
@pytest.mark.filterwarnings('ignore:.*non-meta parameter in the checkpoint to a meta parameter')
def test_mm_train_with_a_local_backbone_checkpoint(official_backbone_file, forbid_downloads):
    """The documented overrides: the model builds (meta device, as tests/test_heads.py builds every config),
    and its backbone, once initialised as the Runner initialises a training run, holds the file's weights;
    nothing is downloaded."""
    import mmcv.ops  # noqa: F401  (fails loudly if mmcv was built without its ops)
    cfg = _prepare('mm_train', mm_commands()['tools/mm_train.py', ''])
    assert cfg.model.backbone.pretrained is False and not cfg.get('resume')
    _build(cfg.model, cfg.default_scope, 'meta')
    backbone = _build(cfg.model.backbone, cfg.default_scope, 'cpu')
    backbone.init_weights()
    # timm's feature wrapper keeps the model under 'model.' (the getter wrapper of the attnzoo families)
    loaded = {k.removeprefix('model.'): v for k, v in backbone.features.state_dict().items()}
    for key, value in official_backbone_file.items():
        if key in loaded:
            assert torch.equal(loaded[key], value), key
    assert sum(key in loaded for key in official_backbone_file) > 100


@needs_mm
@pytest.mark.mm
def test_mm_test_of_a_trained_checkpoint_downloads_nothing(tmp_path, monkeypatch, forbid_downloads):
    """The documented test command with the config as it is (pretrained=True): the model is built from the
    config and the checkpoint loaded over it, so building it must not fetch the backbone's weights."""
    import mmcv.ops  # noqa: F401
    argv = mm_commands()['tools/mm_test.py', '']
    monkeypatch.chdir(tmp_path)
    Path(argv[1]).parent.mkdir(parents=True)
    Path(argv[1]).write_bytes(b'')
    cfg = _prepare('mm_test', argv)
    assert cfg.load_from == argv[1] and cfg.model.backbone.pretrained is True
    _build(cfg.model, cfg.default_scope, 'meta')


@needs_mm
@pytest.mark.mm
def test_mm_resume_command(tmp_path, monkeypatch):
    """--resume without a checkpoint: the work dir's last one (load_from unset), the backbone overrides kept."""
    argv = mm_commands()['tools/mm_train.py', 'resume']
    monkeypatch.chdir(tmp_path)
    cfg = _prepare('mm_train', argv)
    assert cfg.resume is True and cfg.load_from is None
    assert cfg.model.backbone.pretrained is False
    assert cfg.model.backbone.checkpoint == _cfg_option(argv, 'model.backbone.checkpoint')


# ---------------------------------------------------------------------------- the zoo plot


def _dominated(point, others):
    x, y = point
    return any(ox >= x and oy >= y and (ox, oy) != (x, y) for ox, oy in others)


ZOO_RUNS = cards.zoo_runs(ROOT / 'model_cards' / 'benchmarks')


@pytest.mark.parametrize('header, rows', ZOO_RUNS, ids=[header['file'] for header, _ in ZOO_RUNS])
def test_zoo_plot_names_the_pareto_front_and_each_familys_extremes(header, rows, tmp_path, monkeypatch):
    """Drawn from a committed zoo run: every variant with a paper top-1 and a time is a point; the names on
    the plot are exactly the Pareto front of (throughput, top-1) and the smallest and largest variant (by
    parameters) of each family; every other point's name is written under the plot."""
    import matplotlib.figure
    drawn = {}
    save = matplotlib.figure.Figure.savefig

    def record(fig, *args, **kwargs):
        ax = fig.axes[0]
        drawn['names'] = [t.get_text() for t in ax.texts]
        drawn['points'] = sum(len(c.get_offsets()) for c in ax.collections)
        drawn['notes'] = ' '.join(t.get_text() for t in fig.texts)
        return save(fig, *args, **kwargs)
    monkeypatch.setattr(matplotlib.figure.Figure, 'savefig', record)
    cards.plot_zoo(rows, tmp_path / 'zoo.png', 'zoo')

    shown = {}   # name -> (img/s, top-1, params, family)
    for fam in zoo.FAMILIES:
        for v in fam.variants:
            row = rows.get(v.name)
            if v.top1 is not None and row is not None and not row.get('error'):
                shown[v.name] = (row['extra']['img_per_s'], v.top1, row['extra']['params'], fam.card)
    front = {name for name, p in shown.items() if not _dominated(p[:2], [q[:2] for q in shown.values()])}
    extremes = set()
    for fam in zoo.FAMILIES:
        members = {name: p[2] for name, p in shown.items() if p[3] == fam.card}
        if members:
            extremes |= {min(members, key=members.get), max(members, key=members.get)}
    assert len(front) >= 3 and len(shown) > 40
    assert len(drawn['names']) == len(set(drawn['names']))
    assert set(drawn['names']) == front | extremes
    assert drawn['points'] == len(shown)
    for name in set(shown) - front - extremes:
        assert re.search(rf'\b{name}\b', drawn['notes']), name
