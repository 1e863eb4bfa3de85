"""Exports a timm / attnzoo model (the classifier, or with ``--features`` its features_only backbone) to ONNX or
to a ``torch.export`` program, and checks the export against eager PyTorch.

    python tools/export.py nat_mini -o nat_mini.onnx --dynamic both
    python tools/export.py biformer_tiny --checkpoint biformer_tiny.pth --features --dynamic batch -o biformer.onnx
    python tools/export.py cswin_tiny_224 --format pt2 --dynamic both -o cswin_tiny_224.pt2

``--format onnx``: ``torch.onnx.export(..., dynamo=True)``; the attnzoo attention ops are translated into standard
ONNX ops through their PyTorch references (``attnzoo/kernels/_onnx.py``), so no custom ONNX domain is needed.
The file is checked in onnxruntime (CPU). ``--format pt2``: ``torch.export.export``, written by
``torch.export.save``; the program calls the attnzoo ops (their fused / CPU kernels), so load it after
``import attnzoo.kernels``, or run ``program.run_decompositions(attnzoo.kernels._onnx.DECOMPOSITIONS)`` for a
program of aten ops only.

``--dynamic`` names the axes of the input that stay free: ``batch``, ``hw`` (height and width), ``both`` or
``none``. The check runs the export and the eager model on fresh random images at the export shape and, per
dynamic axis, at another size (batch + 1; height + 32 and width + 64), prints the largest absolute difference
of every output and fails above ``--atol``. With a dynamic height and width the tool prints the sizes the export
holds for (per axis, the sizes that pass torch.export's ranges and the shape guards the trace left, checked up
to 4096): the ``.pt2`` program checks its guards when run, an ONNX runtime does not, so keep an ONNX file's inputs
within the printed ranges.

``--checkpoint`` loads weights the way every attnzoo tool does (``weights_only`` reading, the family's checkpoint
filter, a strict fit); the classifier keeps the checkpoint's number of classes. ``--latency`` also times the eager model and the ONNX file on one CPU thread
and prints their ratio (as the cards report it).
"""
import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import timm
import torch
from torch.utils._sympy.numbers import int_oo   # torch.export's unbounded range

from attnzoo.backbones._families import family_of
import _checkpoints as checkpoints
import _models as models
import _runtime as runtime
from benchlib.provenance import cpu_model, device_name

FORMATS = ('onnx', 'pt2')
DYNAMIC = {'none': (), 'batch': ('batch',), 'hw': ('hw',), 'both': ('batch', 'hw')}
EXTRA_SIZE = (32, 64)   # the second H x W of the check: the export size plus these (every family's stride divides them)

# families whose graph is fixed to one input size, and why (the model, not the exporter, decides this)
STATIC_HW_FAMILIES = {
    'maxxvit': "MaxViT's window and grid partitions are sized from img_size when the model is built (timm "
               'asserts the input matches); export one file per size, built with --img-size H W',
    'byoanet': "HaloNet's halo attention asserts that every feature map divides into its blocks, which timm "
               'checks on the traced size; export one file per size, built with --img-size H W',
    'biformer': "BiFormer pads every map to a multiple of its routing grid (7 x 7 regions), and torch.export fixes "
                "what the routing ops' reshapes and their decompositions read of the tokens per region (the padded "
                'map over the grid) of every stage, such as whether a region holds one token or several: even with '
                'the padding written for a symbolic size, a graph traced at 64 x 64 holds only for inputs of 57 to '
                '112 pixels a side (measured), not the any size the eager model takes; export one file per size, '
                'with --img-size H W',
    'cswin': "CSWin's export holds only for the input sizes that keep every stage's stripe count on the traced "
             "side of 1 (torch.export specialises a count of 1: at 64 x 64 the third stage's map is one stripe, and "
             'the graph holds for 59 to 66 pixels a side), and cropping its padding back leaves guards on whether '
             'anything was padded; export one file per size, with --img-size H W',
    'transnext': "TransNeXt's position bias is built for the model's img_size and resized to the map with Python "
                 'arithmetic on the map size (max, integer division), which torch.export fixes to the traced size; '
                 'export one file per size, built with --img-size H W',
}

# families whose models are built for one input size (timm's img_size argument): --img-size builds them for it
SIZED_AT_BUILD = ('maxxvit', 'byoanet', 'transnext')

SCAN_LIMIT = 4096   # the largest height and width size_ranges checks an export's guards at


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('model', help='timm or attnzoo model name, e.g. nat_mini')
    p.add_argument('-o', '--output', required=True, help='file to write (.onnx or .pt2)')
    p.add_argument('--checkpoint', default=None, help='weights: .safetensors, .pth, .pt or .bin (official or attnzoo)')
    p.add_argument('--format', choices=FORMATS, default='onnx')
    p.add_argument('--dynamic', choices=tuple(DYNAMIC), default='batch', help='input axes left free in the export')
    p.add_argument('--img-size', type=int, nargs=2, metavar=('H', 'W'), default=None,
                   help="export input size; default: the model's own")
    p.add_argument('--features', action='store_true', help='export the features_only backbone (the pyramid maps)')
    p.add_argument('--atol', type=float, default=1e-4, help='largest absolute difference to eager the check accepts')
    p.add_argument('--latency', action='store_true',
                   help='also time eager PyTorch and onnxruntime on one CPU thread and print the ratio')
    p.add_argument('--latency-json', default=None, metavar='PATH', help='append the latency result to this JSON file')
    return p


def step(number: int, total: int, message: str) -> None:
    print(f'[{number}/{total}] {message}', flush=True)


def _checkpoint_classes(state_dict: Dict[str, torch.Tensor], name: str) -> int:
    """The classes of the checkpoint's classifier (its weight under the model's classifier name), else the
    model's default."""
    cfg = timm.get_pretrained_cfg(name)
    weight = state_dict.get(f'{cfg.classifier}.weight')
    return int(weight.shape[0]) if weight is not None and weight.dim() >= 1 else cfg.num_classes


def load_model(name: str, checkpoint: Optional[str], features: bool, img_size: Optional[Sequence[int]]):
    """The eval-mode classifier or features_only backbone of ``name``, with the checkpoint's weights."""
    kwargs = dict(features_only=True) if features else {}
    if img_size is not None and family_of(name) in SIZED_AT_BUILD:
        kwargs['img_size'] = tuple(img_size)
    if checkpoint is not None:
        state_dict = checkpoints.read_state_dict(checkpoint)
        num_classes = _checkpoint_classes(state_dict, name)
        with torch.device('meta'):
            shapes_only = timm.create_model(name, num_classes=num_classes, **{k: v for k, v in kwargs.items()
                                                                               if k != 'features_only'})
        state_dict = checkpoints.fit_to_model(shapes_only, state_dict, checkpoint)
        num_classes = _checkpoint_classes(state_dict, name)
        # timm's pretrained path loads the fitted weights strictly and prunes what features_only drops
        kwargs.update(pretrained=True, num_classes=num_classes,
                      pretrained_cfg_overlay=dict(state_dict=state_dict, num_classes=num_classes))
    return timm.create_model(name, **kwargs).eval()


def input_size(model, img_size: Optional[Sequence[int]]):
    if img_size is not None:
        return tuple(img_size)
    return tuple(model.pretrained_cfg['input_size'][1:])


def check_dynamic_hw(name: str, dynamic: str) -> None:
    family = family_of(name)
    if 'hw' in DYNAMIC[dynamic] and family in STATIC_HW_FAMILIES:
        raise runtime.ToolError(f'{name} cannot be exported with a dynamic height and width: '
                                f'{STATIC_HW_FAMILIES[family]}. Use --dynamic batch (or none).')


def dynamic_shapes(dynamic: str):
    """torch.export's dynamic_shapes of the one image input (None where nothing is dynamic)."""
    axes = DYNAMIC[dynamic]
    if not axes:
        return None
    free = torch.export.Dim.DYNAMIC   # an error, not a silent specialisation, where the model fixes the axis
    spec = {}
    if 'batch' in axes:
        spec[0] = free
    if 'hw' in axes:
        spec[2] = spec[3] = free
    return (spec,)


def example_batch(dynamic: str) -> int:
    # torch.export specialises axes of size 1, so a dynamic batch is traced at 2
    return 2 if 'batch' in DYNAMIC[dynamic] else 1


def check_shapes(size, dynamic: str):
    """The inputs of the check: the export shape, then a second batch size and a second H x W per dynamic axis."""
    batch, axes = example_batch(dynamic), DYNAMIC[dynamic]
    shapes = [(batch, 3, *size)]
    if 'batch' in axes:
        shapes.append((batch + 1, 3, *size))
    if 'hw' in axes:
        shapes.append((batch, 3, size[0] + EXTRA_SIZE[0], size[1] + EXTRA_SIZE[1]))
    return shapes


def _outputs(value) -> List[torch.Tensor]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def export_program(model, example: torch.Tensor, dynamic: str) -> torch.export.ExportedProgram:
    return torch.export.export(model, (example,), dynamic_shapes=dynamic_shapes(dynamic))


def export_onnx(program: torch.export.ExportedProgram, path: Path, features: bool, optimize: bool = True) -> None:
    """The ONNX file of ``program``; ``optimize``: onnxscript's optimizer passes (constant folding and the like)."""
    names = [f'features{i}' for i in range(len(program.graph_signature.user_outputs))] if features else ['logits']
    onnx_program = torch.onnx.export(program, input_names=['image'], output_names=names, dynamo=True, verbose=False,
                                     optimize=optimize)
    onnx_program.save(str(path))


def size_ranges(program: torch.export.ExportedProgram) -> Dict[str, Tuple[int, Optional[int]]]:
    """The input heights and widths the program holds for, where they are dynamic, as (lowest, highest or None).

    Per axis, the other at the export size: the band of sizes around the export size that pass every check the
    program makes when run: torch.export's range of the axis, and the guards that the traced model's shape
    arithmetic left, which a range does not show (a stage's map that must not be 1 wide, a padding that must
    stay zero). None: torch.export's range is unbounded and every size up to SCAN_LIMIT passes."""
    image = next(node for node in program.graph.nodes if node.op == 'placeholder'
                 and node.name in program.graph_signature.user_inputs)
    shape = list(image.meta['val'].shape)
    if not any(isinstance(size, torch.SymInt) for size in shape[2:]):
        return {}
    traced = [int(size.node.hint) if isinstance(size, torch.SymInt) else size for size in shape]
    guards = getattr(program.module(), '_guards_fn', None)   # what the program's module checks when run

    def holds(axis: int, size: int) -> bool:
        if guards is None:
            return True
        try:
            guards(torch.empty(traced[:axis] + [size] + traced[axis + 1:], device='meta'))
        except AssertionError:
            return False
        return True

    ranges = {}
    for name, axis in (('height', 2), ('width', 3)):
        if not isinstance(shape[axis], torch.SymInt):
            continue
        bounds = program.range_constraints[shape[axis].node.expr]
        lowest, highest = traced[axis], traced[axis]
        while lowest > max(int(bounds.lower), 1) and holds(axis, lowest - 1):
            lowest -= 1
        limit = SCAN_LIMIT if bounds.upper == int_oo else min(int(bounds.upper), SCAN_LIMIT)
        while highest < limit and holds(axis, highest + 1):
            highest += 1
        ranges[name] = (lowest, None if highest == SCAN_LIMIT and bounds.upper == int_oo else highest)
    return ranges


def describe_ranges(ranges: Dict[str, Tuple[int, Optional[int]]]) -> str:
    return ', '.join(f'{axis} {low} to {"any" if high is None else high}' for axis, (low, high) in ranges.items())


def onnx_session(path: Path, threads: Optional[int] = None):
    import onnxruntime
    options = onnxruntime.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(str(path), options, providers=['CPUExecutionProvider'])


def exported_runner(fmt: str, path: Path):
    """A function image -> list of outputs that runs the written file."""
    if fmt == 'onnx':
        session = onnx_session(path)
        input_name = session.get_inputs()[0].name
        return lambda x: [torch.from_numpy(y) for y in session.run(None, {input_name: x.numpy()})]
    module = torch.export.load(str(path)).module()
    return lambda x: _outputs(module(x))


def check_export(model, run, shapes) -> List[dict]:
    """Max abs difference of every output of the export to eager, per input shape."""
    results = []
    for shape in shapes:
        x = torch.randn(shape)
        with torch.inference_mode():
            expected = _outputs(model(x))
        got = run(x)
        if len(got) != len(expected) or any(g.shape != e.shape for g, e in zip(got, expected)):
            raise runtime.ToolError(f'the export returns {[tuple(g.shape) for g in got]} for input {shape}, eager '
                                    f'{[tuple(e.shape) for e in expected]}')
        results.append(dict(shape=shape, max_abs_diff=max((g - e).abs().max().item() for g, e in zip(got, expected))))
    return results


def _median_seconds(fn, x, repeats: int) -> float:
    fn(x)   # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_latency(model, path: Path, shape, repeats: int = 10) -> dict:
    """Median latency of eager PyTorch and onnxruntime on one CPU thread, and their ratio."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        session = onnx_session(path, threads=1)
        input_name = session.get_inputs()[0].name
        x = torch.randn(shape)
        with torch.inference_mode():
            eager = _median_seconds(model, x, repeats)
        onnx = _median_seconds(lambda t: session.run(None, {input_name: t.numpy()}), x, repeats)
    finally:
        torch.set_num_threads(threads)
    import onnxruntime
    return dict(eager_ms=eager * 1e3, onnxruntime_ms=onnx * 1e3, ratio=onnx / eager, shape=list(shape), threads=1,
                load_average=os.getloadavg()[0], cpus=os.cpu_count(), device=device_name('cpu'), cpu=cpu_model(),
                torch=torch.__version__, onnxruntime=onnxruntime.__version__)


def export(args) -> List[dict]:
    if not timm.is_model(args.model):
        raise runtime.ToolError(models.unknown_model_message(args.model))
    check_dynamic_hw(args.model, args.dynamic)
    if args.latency and args.format != 'onnx':
        raise runtime.ToolError('--latency times onnxruntime: use it with --format onnx')
    output = Path(args.output)
    if output.parent and not output.parent.is_dir():
        raise runtime.ToolError(f'the folder of --output {output} does not exist')
    total = 4 if args.latency else 3
    what = 'features_only backbone' if args.features else 'classifier'
    step(1, total, f'building the {args.model} {what}' + (f' from {args.checkpoint}' if args.checkpoint else ''))
    model = load_model(args.model, args.checkpoint, args.features, args.img_size)
    size = input_size(model, args.img_size)
    example = torch.randn(example_batch(args.dynamic), 3, *size)
    step(2, total, f'exporting to {args.format} at {tuple(example.shape)}, dynamic: {args.dynamic} -> {output}')
    try:
        program = export_program(model, example, args.dynamic)
    except torch._dynamo.exc.UserError as err:   # a dynamic axis the model fixes (constraint violation)
        raise runtime.ToolError(f'{args.model} cannot be exported with --dynamic {args.dynamic}: the model fixes '
                                f'an axis torch.export was asked to leave free ({str(err).splitlines()[0]}); '
                                f'use --dynamic batch or none') from err
    ranges = size_ranges(program)
    if ranges:
        # the .pt2 program checks its guards when run; an ONNX graph carries none of them
        print(f'  the export holds for input sizes: {describe_ranges(ranges)} (each with the other at the '
              f'export size; the .pt2 program checks its guards, an ONNX runtime does not: keep its inputs within '
              f'them)')
    if args.format == 'onnx':
        export_onnx(program, output, args.features)
    else:
        torch.export.save(program, str(output))
    step(3, total, f'checking against eager on fresh inputs {[tuple(s) for s in check_shapes(size, args.dynamic)]}')
    results = check_export(model, exported_runner(args.format, output), check_shapes(size, args.dynamic))
    for result in results:
        print(f'  input {tuple(result["shape"])}: max abs difference to eager {result["max_abs_diff"]:.3g}')
    worst = max(r['max_abs_diff'] for r in results)
    if not worst <= args.atol:
        raise runtime.ToolError(f'the export differs from eager by {worst:.3g} > --atol {args.atol:g}')
    if args.latency:
        step(4, total, 'timing eager PyTorch and onnxruntime on one CPU thread')
        latency = measure_latency(model, output, (1, 3, *size))
        print(f'  eager {latency["eager_ms"]:.1f} ms, onnxruntime {latency["onnxruntime_ms"]:.1f} ms: '
              f'ratio {latency["ratio"]:.2f} (load average {latency["load_average"]:.1f} on {latency["cpus"]} CPUs)')
        if args.latency_json:
            _append_json(Path(args.latency_json), dict(model=args.model, features=args.features,
                                                       dynamic=args.dynamic, **latency))
    print(f'wrote {output}')
    return results


def _append_json(path: Path, record: dict) -> None:
    rows = json.loads(path.read_text()) if path.is_file() else []
    rows = [r for r in rows if (r['model'], r['features']) != (record['model'], record['features'])] + [record]
    path.write_text(json.dumps(rows, indent=1) + '\n')


def main(argv=None):
    export(build_parser().parse_args(argv))


if __name__ == '__main__':
    runtime.run_cli(main)
