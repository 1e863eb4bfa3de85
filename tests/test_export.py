"""Export: the attnzoo ops' ONNX translation against their references, every family through
``torch.onnx.export(dynamo=True)`` + onnxruntime and through ``torch.export`` against eager, and tools/export.py.

Dynamic axes are checked where they matter: one exported graph is run at a second batch size and, where the
family takes any input size, at a second height x width. The default suite checks the ops' translation, the
tool end to end (NAT from a checkpoint through ONNX, SHViT's backbone through torch.export) and the smallest variant
of each of the 14 families with a dynamic batch at 64 x 64; ``slow`` each family's smallest variant with a dynamic
height and width, and every variant at its own resolution (a family export takes 10 s to over a minute of CPU time).
"""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from torch import nn
from torch.export import Dim

import attnzoo.backbones  # noqa: F401  registers the attnzoo families
from attnzoo.backbones._families import family_of
from attnzoo.backbones._layers import NeighborhoodAttention
from attnzoo.kernels import neighborhood_attention_2d, routing_attention, routing_region_index
from attnzoo.kernels.neighborhood import neighborhood_attention_2d_reference
from attnzoo.kernels.routing import routing_attention_reference
from reference_params import OFFICIAL_PARAMS

onnxruntime = pytest.importorskip('onnxruntime', reason='the export extra (pip install -e .[export]) is not installed')
pytest.importorskip('onnxscript', reason='the export extra (pip install -e .[export]) is not installed')

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'tools'))
from benchlib import zoo  # noqa: E402
import export as export_tool  # noqa: E402

ATOL = 1e-4


def onnx_run(module, args, dynamic_shapes, path):
    """Exports ``module`` with torch.export, then from that program with torch.onnx (dynamo) to ``path``; returns a
    function of tensors that runs the ONNX file after the program (which checks its shape guards: it refuses a
    size the trace fixed, where onnxruntime would run on without a word)."""
    program = torch.export.export(module, args, dynamic_shapes=dynamic_shapes)
    torch.onnx.export(program, dynamo=True, verbose=False).save(str(path))
    session = onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    names = [i.name for i in session.get_inputs()]
    guarded = program.module()

    def run(*tensors):
        guarded(*tensors)
        return [torch.from_numpy(out) for out in session.run(None, dict(zip(names, (t.numpy() for t in tensors))))]
    return run


# ------------------------------------------------------------------------------------- the ops' translation

class Neighborhood(nn.Module):
    def __init__(self, **geometry):
        super().__init__()
        self.geometry = geometry

    def forward(self, q, k, v, rpb, extra_k, extra_v, extra_bias, window_weight):
        return neighborhood_attention_2d(q, k, v, rpb=rpb, extra_k=extra_k, extra_v=extra_v, extra_bias=extra_bias,
                                         window_weight=window_weight, **self.geometry)


def neighborhood_inputs(batch, height, width, heads=2, head_dim=16, kernel=(3, 5), extra=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = [torch.randn(batch, height, width, heads, head_dim, generator=g) for _ in range(3)]
    rpb = torch.randn(heads, 2 * kernel[0] - 1, 2 * kernel[1] - 1, generator=g)
    extra_kv = [torch.randn(batch, extra, heads, head_dim, generator=g) for _ in range(2)]
    extra_bias = torch.randn(batch, heads, height, width, extra, generator=g)
    window_weight = torch.randn(batch, height, width, heads, kernel[0] * kernel[1], generator=g) * 0.1
    return (*qkv, rpb, *extra_kv, extra_bias, window_weight)


# geometry, the smallest map, the traced size, the second size: the sizes the op takes in eager mode, a clamped
# window no larger than the map (kernel * dilation), a zero border's any map (the second size is smaller than it)
NEIGHBORHOOD_CASES = {
    'clamp-dilated': (dict(kernel_size=(3, 5), dilation=(2, 1), border='clamp'), (6, 5), (2, 7, 6), (3, 9, 11)),
    'zero-border': (dict(kernel_size=(3, 5), dilation=1, border='zero'), (2, 2), (2, 5, 6), (3, 2, 4)),
}


@pytest.mark.parametrize('case', NEIGHBORHOOD_CASES)
def test_neighborhood_translation_matches_the_reference_at_two_sizes(case, tmp_path):
    """One exported graph (rpb, extra tokens, extra_bias, window_weight; dynamic batch and map) equals the
    reference at the traced size and at another batch and map size."""
    geometry, smallest, traced, second = NEIGHBORHOOD_CASES[case]
    batch, height, width = Dim('batch', min=1), Dim('height', min=smallest[0]), Dim('width', min=smallest[1])
    map5 = {0: batch, 1: height, 2: width}
    dynamic = (map5, map5, map5, None, {0: batch}, {0: batch}, {0: batch, 2: height, 3: width}, map5)
    run = onnx_run(Neighborhood(**geometry), neighborhood_inputs(*traced), dynamic, tmp_path / 'na.onnx')
    for size in (traced, second):
        inputs = neighborhood_inputs(*size, seed=sum(size))
        q, k, v, rpb, extra_k, extra_v, extra_bias, window_weight = inputs
        expected = neighborhood_attention_2d_reference(q, k, v, rpb=rpb, extra_k=extra_k, extra_v=extra_v,
                                                       extra_bias=extra_bias, window_weight=window_weight, **geometry)
        torch.testing.assert_close(run(*inputs)[0], expected, atol=1e-5, rtol=1e-5, msg=f'{case} at {size}')


class Routing(nn.Module):
    """BiFormer's pattern: the routing computed in the graph from q and k, then the routed attention."""

    def __init__(self, regions, topk):
        super().__init__()
        self.regions, self.topk = regions, topk

    def forward(self, q, k, v):
        index = routing_region_index(q, k, self.regions, self.topk)
        return routing_attention(q, k, v, index, self.regions), index


def test_routing_translation_matches_the_reference_at_two_sizes(tmp_path):
    regions, topk = (2, 3), 2
    region_h, region_w = Dim('region_h', min=1), Dim('region_w', min=1)
    shape = {0: Dim('batch', min=1), 1: 2 * region_h, 2: 3 * region_w}
    g = torch.Generator().manual_seed(0)

    def qkv(batch, height, width):
        return tuple(torch.randn(batch, height, width, 2, 16, generator=g) for _ in range(3))
    run = onnx_run(Routing(regions, topk), qkv(2, 4, 6), (shape, shape, shape), tmp_path / 'routing.onnx')
    for size in ((2, 4, 6), (3, 6, 9)):
        q, k, v = qkv(*size)
        out, index = run(q, k, v)
        expected_index = routing_region_index(q, k, regions, topk)
        torch.testing.assert_close(index, expected_index, msg=f'routing at {size}')
        torch.testing.assert_close(out, routing_attention_reference(q, k, v, expected_index, regions), atol=1e-5,
                                   rtol=1e-5, msg=f'routing at {size}')


# ------------------------------------------------------------------------------------------------ families

SMALL_SIZE = 64                              # every family that takes any input size runs at 64 x 64
STATIC_SMALL_SIZE = {'byoanet': 256}         # HaloNet's stage-4 map must hold whole 8 x 8 blocks
# a free height and width is traced where no map is 1 wide (torch.export specialises a size of 1, and the graph would
# hold for the inputs that keep it 1 alone): SHViT's last map is 1 pixel wide at 64 x 64, 2 at 128 x 128
DYNAMIC_SMALL_SIZE = {'shvit': 128}
# zoo families that hold two papers' families: the second one's variants, by name
SECOND_PAPER_FAMILY = {'nat': 'dinat_', 'crossformer': 'crossformer_pp_'}


def smallest_variants():
    """The smallest variant of each of the 14 families (NAT and DiNAT, CrossFormer and CrossFormer++ apart)."""
    names = []
    for fam in zoo.FAMILIES:
        groups = [fam.variant_names()]
        if fam.card in SECOND_PAPER_FAMILY:
            prefix = SECOND_PAPER_FAMILY[fam.card]
            groups = [[n for n in groups[0] if not n.startswith(prefix)], [n for n in groups[0] if n.startswith(prefix)]]
        names += [min(group, key=OFFICIAL_PARAMS.get) for group in groups]
    return names


def small_model(name, dynamic_size=False):
    """``name``'s classifier for a small input (built for it where the family fixes the size), and that size;
    ``dynamic_size``: the size to export with a free height and width at."""
    family = family_of(name)
    size = (DYNAMIC_SMALL_SIZE if dynamic_size else STATIC_SMALL_SIZE).get(family, SMALL_SIZE)
    kwargs = dict(img_size=size) if family in export_tool.SIZED_AT_BUILD else {}
    return timm.create_model(name, **kwargs).eval(), (size, size)


def export_and_check(model, name, size, dynamic, tmp_path, optimize=True):
    """torch.export with the ``dynamic`` axes, checked against eager at the traced shape, another batch size and
    (where free) another H x W; then ONNX from that one program, checked in onnxruntime at the same shapes."""
    example = torch.randn(export_tool.example_batch(dynamic), 3, *size)
    program = torch.export.export(model, (example,), dynamic_shapes=export_tool.dynamic_shapes(dynamic))
    shapes = export_tool.check_shapes(size, dynamic)
    assert len(shapes) == 1 + len(export_tool.DYNAMIC[dynamic])
    exported = program.module()
    for result in export_tool.check_export(model, lambda x: export_tool._outputs(exported(x)), shapes):
        assert result['max_abs_diff'] <= ATOL, (name, 'torch.export', result)
    path = tmp_path / f'{name}.onnx'
    torch.onnx.export(program, dynamo=True, verbose=False, optimize=optimize).save(str(path))
    for result in export_tool.check_export(model, export_tool.exported_runner('onnx', path), shapes):
        assert result['max_abs_diff'] <= ATOL, (name, 'onnxruntime', result)


def test_every_family_is_checked():
    assert len(smallest_variants()) == 14 and len(set(map(family_of, smallest_variants()))) == 12


# One export per family, dynamic in the batch (the 14 take about 480 s of CPU time, spread over the suite's
# workers); ONNX without onnxscript's optimizer passes (a third of the ONNX step's time; the tool's own tests run
# them): the family's graph, not the optimizer, is what is checked here.
@pytest.mark.parametrize('name', smallest_variants())
def test_smallest_variant_exports_with_a_dynamic_batch(name, tmp_path):
    model, size = small_model(name)
    export_and_check(model, name, size, 'batch', tmp_path, optimize=False)


@pytest.mark.slow   # a free H x W costs several times a batch-only export's time (symbolic map sizes)
@pytest.mark.parametrize('name', [n for n in smallest_variants() if family_of(n) not in export_tool.STATIC_HW_FAMILIES])
def test_smallest_variant_exports_with_a_dynamic_size(name, tmp_path):
    model, size = small_model(name, dynamic_size=True)
    export_and_check(model, name, size, 'both', tmp_path)


class NeighborhoodLayer(nn.Module):
    """NAT's / DiNAT's attention layer on an NCHW map (the layout whose height and width the tool's ranges read)."""

    def __init__(self, kernel_size, dilation):
        super().__init__()
        self.attn = NeighborhoodAttention(32, num_heads=2, kernel_size=kernel_size, dilation=dilation)

    def forward(self, x):
        return self.attn(x.permute(0, 2, 3, 1))


@pytest.mark.parametrize('kernel_size,dilation', [(7, 1), (3, 3)])
def test_neighborhood_layer_exports_for_every_map_size(kernel_size, dilation):
    """The layer zero-pads a map smaller than its window (kernel_size * dilation = 7, 9) and crops back: one graph,
    traced where the rows are padded and the columns not, holds for every map size (torch.export's ranges are
    unbounded and no guard fixes a side of the window) and equals eager on both sides of the window per axis."""
    torch.manual_seed(0)
    layer = NeighborhoodLayer(kernel_size, dilation).eval()
    with torch.no_grad():
        layer.attn.qkv.bias.normal_()   # the padded tokens' keys and values
    program = export_tool.export_program(layer, torch.randn(2, 32, 5, 12), 'both')
    assert export_tool.size_ranges(program) == {'height': (2, None), 'width': (2, None)}
    exported = program.module()
    for height, width in ((2, 3), (7, 7), (9, 9), (30, 4), (41, 40)):
        x = torch.randn(3, 32, height, width)
        with torch.no_grad():
            torch.testing.assert_close(exported(x), layer(x), atol=1e-5, rtol=1e-5, msg=f'map {height} x {width}')


# NAT / DiNAT at 64 x 64: a graph of the layer's former padding (a Python branch on each map's size) held only for a
# band of sizes around the traced one (dinat_mini's failed its guards at 128 and 224 pixels a side)
@pytest.mark.slow
@pytest.mark.parametrize('name', ['nat_mini', 'dinat_mini'])
def test_neighborhood_families_export_for_every_input_size(name, tmp_path):
    """One export at 64 x 64 holds for every input size from 33 (the smallest whose last stage map is 2 pixels
    wide, where torch.export specialises a size of 1: eager takes 32 too) up, both in its ranges and when run
    (torch.export's program and onnxruntime) at sizes well outside the former band."""
    model, size = small_model(name)
    program = export_tool.export_program(model, torch.randn(2, 3, *size), 'both')
    assert export_tool.size_ranges(program) == {'height': (33, None), 'width': (33, None)}
    torch.onnx.export(program, dynamo=True, verbose=False, optimize=False).save(str(tmp_path / f'{name}.onnx'))
    exported = program.module()
    for run in (lambda x: export_tool._outputs(exported(x)), export_tool.exported_runner('onnx', tmp_path / f'{name}.onnx')):
        for result in export_tool.check_export(model, run, [(1, 3, 33, 40), (2, 3, 224, 160)]):
            assert result['max_abs_diff'] <= ATOL, (name, result)


@pytest.mark.slow
@pytest.mark.parametrize('name', [v.name for v in zoo.all_variants()])
def test_every_variant_exports_at_its_resolution(name, tmp_path):
    export_and_check(timm.create_model(name).eval(), name, timm.get_pretrained_cfg(name).input_size[1:], 'batch',
                     tmp_path)


# ------------------------------------------------------------------------------------------- tools/export.py

def run_tool(*args):
    return subprocess.run([sys.executable, str(ROOT / 'tools' / 'export.py'), *map(str, args)], capture_output=True,
                          text=True, timeout=900)


# a free H x W costs NAT's ONNX export minutes (the ops' own dynamic sizes are checked above, in seconds)
@pytest.mark.parametrize('dynamic', ['batch', pytest.param('both', marks=pytest.mark.slow)])
def test_tool_exports_a_checkpoint_with_its_classes(dynamic, tmp_path):
    """--checkpoint: the written ONNX classifier has the checkpoint's 10 classes and weights at another batch (and,
    with --dynamic both, input) size, checked here against the model that holds them, apart from the tool's check."""
    import safetensors.torch
    torch.manual_seed(0)
    trained = timm.create_model('nat_mini', num_classes=10).eval()
    safetensors.torch.save_file(trained.state_dict(), str(tmp_path / 'nat.safetensors'))
    result = run_tool('nat_mini', '--checkpoint', tmp_path / 'nat.safetensors', '--dynamic', dynamic, '--img-size', 64,
                      64, '-o', tmp_path / 'nat.onnx')
    assert result.returncode == 0, result.stdout + result.stderr
    checked = ('(2, 3, 64, 64)', '(3, 3, 64, 64)') + (('(2, 3, 96, 128)',) if dynamic == 'both' else ())
    for shape in checked:
        assert f'input {shape}: max abs difference to eager' in result.stdout, result.stdout
    assert ('the export holds for input sizes: height' in result.stdout) == (dynamic == 'both'), result.stdout
    run = export_tool.exported_runner('onnx', tmp_path / 'nat.onnx')
    for shape in ((4, 3, 64, 64),) + (((1, 3, 80, 112),) if dynamic == 'both' else ()):
        x = torch.randn(shape)
        with torch.inference_mode():
            expected = trained(x)
        got = run(x)[0]
        assert got.shape == (shape[0], 10)
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_tool_exports_the_features_backbone_as_a_program(tmp_path):
    result = run_tool('shvit_s1', '--features', '--format', 'pt2', '--dynamic', 'batch', '--img-size', 64, 64,
                      '-o', tmp_path / 'shvit.pt2')
    assert result.returncode == 0, result.stdout + result.stderr
    for shape in ('(2, 3, 64, 64)', '(3, 3, 64, 64)'):
        assert f'input {shape}: max abs difference to eager' in result.stdout, result.stdout
    features = timm.create_model('shvit_s1', features_only=True).eval()
    program = torch.export.load(str(tmp_path / 'shvit.pt2')).module()
    features.load_state_dict(program.state_dict())
    x = torch.randn(5, 3, 64, 64)
    with torch.inference_mode():
        expected = features(x)
    got = program(x)
    assert len(got) == len(features.feature_info)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=ATOL, rtol=0)


@pytest.mark.parametrize('name', ['maxvit_tiny_tf_224', 'biformer_tiny'])
def test_tool_refuses_a_dynamic_size_where_the_family_fixes_it(name, tmp_path):
    result = run_tool(name, '--dynamic', 'both', '-o', tmp_path / 'model.onnx')
    assert result.returncode == 1
    assert f'error: {name} cannot be exported with a dynamic height and width' in result.stderr, result.stderr
    assert 'Use --dynamic batch' in result.stderr and not (tmp_path / 'model.onnx').exists()


class Bounded(nn.Module):
    """A model whose shape arithmetic bounds its input: height at least 8, width at most 40 (torch.export's ranges),
    and more than 64 pixels (a guard on both axes, which no range shows)."""

    def forward(self, x):
        torch._check(x.shape[2] >= 8)
        torch._check(x.shape[3] <= 40)
        if x.shape[2] * x.shape[3] > 64:
            return x.mean((2, 3))
        return x.amax((2, 3))


def test_tool_states_the_sizes_an_export_holds_for():
    program = export_tool.export_program(Bounded(), torch.randn(2, 3, 16, 16), 'both')
    # the width with the height at 16: more than 4 columns
    assert export_tool.size_ranges(program) == {'height': (8, None), 'width': (5, 40)}
    assert export_tool.describe_ranges(export_tool.size_ranges(program)) == 'height 8 to any, width 5 to 40'
    assert export_tool.size_ranges(export_tool.export_program(Bounded(), torch.randn(2, 3, 16, 16), 'batch')) == {}


def test_tool_names_an_unknown_model(tmp_path):
    result = run_tool('nat_mimi', '-o', tmp_path / 'model.onnx')
    assert result.returncode == 1 and "unknown model 'nat_mimi'" in result.stderr and 'nat_mini' in result.stderr
