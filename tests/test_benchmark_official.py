"""tools/benchmark.py's official section (an attnzoo variant against its official code, same weights) on a stand-in
checkout that the tests write: the official code itself is never part of attnzoo.

Speed is never asserted: the tool runs, converts the weights, checks the outputs, leaves the process's modules and
timm's registry as it found them, writes complete results, and refuses what it cannot time with a message that says
what to pass.
"""
import json
import sys
import types
from pathlib import Path

import pytest
import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / 'tools'))
import benchmark  # noqa: E402
from _runtime import ToolError  # noqa: E402
from benchlib import official  # noqa: E402
from reference_params import OFFICIAL_PARAMS  # noqa: E402

# the official models/crossformer.py's constructor arguments, building attnzoo's CrossFormer; like BiFormer's and
# TransNeXt's official code, it registers a timm model under an attnzoo name
STAND_IN = '''
from timm.models import register_model
from attnzoo.backbones.crossformer import CrossFormer as AttnzooCrossFormer


class CrossFormer(AttnzooCrossFormer):
    def __init__(self, img_size, patch_size, merge_size, mlp_ratio, embed_dim, depths, num_heads, group_size,
                 crs_interval, use_acl, drop_path_rate):
        super().__init__(embed_dim=embed_dim, depths=tuple(depths), num_heads=tuple(num_heads),
                         group_size=tuple(group_size), interval=tuple(crs_interval), activation_cooling=use_acl,
                         stem_kernel_sizes=tuple(patch_size), merge_kernel_sizes=tuple(merge_size[0]),
                         mlp_ratio=mlp_ratio[0], drop_path_rate=drop_path_rate)


@register_model
def crossformer_tiny(pretrained=False, **kwargs):
    raise AssertionError('the official registration replaced attnzoo\\'s crossformer_tiny')
'''


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """The official section sets torch's thread count for the process: give it back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def checkout(root: Path, source: str = STAND_IN) -> Path:
    (root / 'models').mkdir(parents=True)
    (root / 'models' / '__init__.py').write_text('')
    (root / 'models' / 'crossformer.py').write_text(source)
    return root


def test_official_section_times_a_checkout_with_the_same_weights(tmp_path, monkeypatch):
    repo = checkout(tmp_path / 'CrossFormer')
    elsewhere = types.ModuleType('models')   # another package of the official code's generic name
    monkeypatch.setitem(sys.modules, 'models', elsewhere)
    out = tmp_path / 'out'
    benchmark.main(['official', 'crossformer_tiny', '--official-repo', str(repo), '--batch', '1', '--warmup', '0',
                    '--iters', '1', '--repeats', '2', '--out', str(out)])

    files = sorted(out.glob('*-official-crossformer.*'))
    assert {f.suffix for f in files} == {'.json', '.md', '.csv', '.png'}, files
    report = json.loads(next(f for f in files if f.suffix == '.json').read_text())
    assert report['device'].startswith('CPU ') and report['threads'] == 1 and report['batch'] == 1
    rows = {r['impl']: r for r in report['results']}
    assert set(rows) == {'official', 'attnzoo'}
    ours, theirs = rows['attnzoo']['extra'], rows['official']['extra']
    assert ours['params'] == theirs['params'] == OFFICIAL_PARAMS['crossformer_tiny']
    assert ours['max_rel_difference'] <= official.OUTPUT_RTOL
    assert len(ours['time_vs_official_cpu_per_repeat']) == len(ours['time_vs_official_wall_per_repeat']) == 2
    assert ours['time_vs_official_wall'] == pytest.approx(rows['attnzoo']['ms'] / rows['official']['ms'], rel=0.5)
    assert 'models/crossformer.py: CrossFormer' in next(f for f in files if f.suffix == '.md').read_text()

    # the process as the run found it: the other `models` back, the checkout's modules gone, attnzoo's models
    # still timm's
    assert sys.modules['models'] is elsewhere and 'models.crossformer' not in sys.modules
    assert str(repo) not in sys.path
    assert timm.models.model_entrypoint('crossformer_tiny').__module__ == 'attnzoo.backbones.crossformer'


def test_outputs_that_differ_are_not_timed():
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    shifted = torch.nn.Linear(8, 4)
    shifted.load_state_dict(model.state_dict())
    x = torch.randn(2, 8)
    assert official.output_difference(model, shifted, x) == 0
    with torch.no_grad():
        shifted.bias.add_(1e-3 * model(x).abs().max())
    with pytest.raises(ValueError, match='the outputs differ: .* no ratio is timed'):
        official.output_difference(model, shifted, x)


def test_jitter_moves_every_parameter_and_no_buffer():
    norm = torch.nn.BatchNorm1d(3)
    official.jitter_parameters(norm, seed=0)
    assert not torch.equal(norm.weight, torch.ones(3)) and not torch.equal(norm.bias, torch.zeros(3))
    assert torch.equal(norm.running_var, torch.ones(3))


@pytest.mark.parametrize('argv, message', [
    (['crossformer_tiny'], r'--official-repo: pass a local checkout of https://github.com/cheerss/CrossFormer'),
    (['crossformer_tiny', '--official-repo', '{tmp}/missing'], r'--official-repo .*/missing: no such folder'),
    (['crossformer_tiny', '--official-repo', '{tmp}'], r'no models/crossformer.py there; pass the top folder'),
    (['nat_mini', '--official-repo', '{tmp}'], r'no official build known for nat_mini; .* knows crossformer_tiny'),
    (['crossformer_tiny', 'cswin_tiny_224', '--official-repo', '{tmp}'], r'one official checkout per run'),
    ([], r'name the attnzoo variants to time'),
])
def test_what_cannot_be_timed_is_refused_before_anything_is_built(argv, message, tmp_path):
    with pytest.raises(ToolError, match=message):
        benchmark.parse_args(['official'] + [arg.format(tmp=tmp_path) for arg in argv])


def test_variants_belong_to_the_official_section(capsys):
    with pytest.raises(SystemExit):
        benchmark.parse_args(['models', 'crossformer_tiny'])
    assert 'variants (crossformer_tiny) are for the official section' in capsys.readouterr().err


def test_a_checkout_without_the_builder_is_named(tmp_path):
    repo = checkout(tmp_path / 'CrossFormer', source='class Other:\n    pass\n')
    with pytest.raises(ToolError, match=r'models/crossformer.py has no CrossFormer; pass a checkout of https://'):
        benchmark.main(['official', 'crossformer_tiny', '--official-repo', str(repo), '--iters', '1',
                        '--out', str(tmp_path / 'out')])
    assert 'models' not in sys.modules
