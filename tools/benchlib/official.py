"""The official section of tools/benchmark.py: an attnzoo variant against its family's official code, with the
same weights, timed in one process.

The official code is never part of attnzoo: the user passes a local checkout of the family's repository
(``--official-repo DIR``). :data:`OFFICIAL_BUILDS` says, per variant, how the official code builds the same
model (module, class or factory, arguments: the official configs'). Both models get the same weights without a
download: the official model's random initialisation, every parameter jittered (so that a weight the init
leaves at 1 or 0, a norm's, still tells a wrong conversion), converted through the family's
``checkpoint_filter_fn`` and loaded strictly. Their outputs must agree before anything is timed.

Timing: eval mode, ``torch.inference_mode``, one input of ``batch`` images at the variant's default size. The
two models are called in turns (one call of each per round, :func:`harness.time_interleaved`), ``iters`` rounds
per repeat, the order of the two swapped from one repeat to the next; each repeat gives medians (wall and process
CPU time) and their ratio attnzoo / official (< 1: attnzoo is faster). The reported ratio is the median over the
repeats, with the repeats' spread beside it.
"""
import contextlib
import statistics
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional
from unittest import mock

import torch

from .harness import Result, _fmt, time_interleaved

SECTION = 'official'
# outputs of the two models may differ by float rounding only: max |attnzoo - official| over max |official|
OUTPUT_RTOL = 1e-4


@dataclass(frozen=True)
class OfficialBuild:
    """How the official code builds one variant: ``builder`` (a class or factory function) of ``module``,
    imported with the checkout's ``folder`` first on ``sys.path``, called with ``kwargs``."""
    family: str          # attnzoo's family module (attnzoo.backbones.<family>)
    repo: str            # where the official code is published
    module: str          # e.g. 'models.crossformer'
    builder: str         # e.g. 'CrossFormer'
    kwargs: Dict = field(default_factory=dict)
    folder: str = ''     # the sub-folder of the checkout the code imports from (TransNeXt: 'classification')

    @property
    def source(self) -> Path:
        """The module's file, relative to the checkout."""
        return Path(self.folder, *self.module.split('.')).with_suffix('.py')

    def describe(self) -> str:
        return f'{self.source}: {self.builder}'


def _crossformer(embed_dim, depths, num_heads, plus_plus=False):
    """The official CrossFormer (``models/build.py`` with ``configs/crossformer*/*.yaml`` and config.py's defaults)."""
    generation = (dict(group_size=[4, 4, 14, 7], crs_interval=[4, 2, 1, 1], use_acl=True) if plus_plus
                  else dict(group_size=[7, 7, 7, 7], crs_interval=[8, 4, 2, 1], use_acl=False))
    kwargs = dict(img_size=224, patch_size=[4, 8, 16, 32], merge_size=[[2, 4], [2, 4], [2, 4]], mlp_ratio=[4.] * 4,
                  embed_dim=embed_dim, depths=depths, num_heads=num_heads, drop_path_rate=0., **generation)
    return OfficialBuild('crossformer', 'https://github.com/cheerss/CrossFormer', 'models.crossformer', 'CrossFormer',
                         kwargs)


def _factory(family, repo, module, builder, folder='', **kwargs):
    """A variant that the official code registers as a factory function of its own name."""
    return OfficialBuild(family, repo, module, builder, kwargs, folder)


_CSWIN = ('cswin', 'https://github.com/microsoft/CSWin-Transformer', 'models.cswin')
_BIFORMER = ('biformer', 'https://github.com/rayleizhu/BiFormer', 'models.biformer')
_TRANSNEXT = ('transnext', 'https://github.com/DaiShiResearch/TransNeXt', 'transnext')

OFFICIAL_BUILDS: Dict[str, OfficialBuild] = {
    'crossformer_tiny': _crossformer(64, [1, 1, 8, 6], [2, 4, 8, 16]),
    'crossformer_small': _crossformer(96, [2, 2, 6, 2], [3, 6, 12, 24]),
    'crossformer_base': _crossformer(96, [2, 2, 18, 2], [3, 6, 12, 24]),
    'crossformer_large': _crossformer(128, [2, 2, 18, 2], [4, 8, 16, 32]),
    'crossformer_pp_small': _crossformer(64, [2, 2, 18, 2], [2, 4, 8, 16], plus_plus=True),
    'crossformer_pp_base': _crossformer(96, [2, 2, 18, 2], [3, 6, 12, 24], plus_plus=True),
    'crossformer_pp_large': _crossformer(128, [2, 2, 18, 2], [4, 8, 16, 32], plus_plus=True),
    'crossformer_pp_huge': _crossformer(128, [6, 6, 18, 2], [4, 8, 16, 32], plus_plus=True),
    'cswin_tiny_224': _factory(*_CSWIN, 'CSWin_64_12211_tiny_224'),
    'cswin_small_224': _factory(*_CSWIN, 'CSWin_64_24322_small_224'),
    'cswin_base_224': _factory(*_CSWIN, 'CSWin_96_24322_base_224'),
    'cswin_large_224': _factory(*_CSWIN, 'CSWin_144_24322_large_224'),
    'cswin_base_384': _factory(*_CSWIN, 'CSWin_96_24322_base_384', img_size=384),
    'cswin_large_384': _factory(*_CSWIN, 'CSWin_144_24322_large_384', img_size=384),
    'biformer_tiny': _factory(*_BIFORMER, 'biformer_tiny'),
    'biformer_small': _factory(*_BIFORMER, 'biformer_small'),
    'biformer_base': _factory(*_BIFORMER, 'biformer_base'),
    'transnext_micro': _factory(*_TRANSNEXT, 'transnext_micro', folder='classification'),
    'transnext_tiny': _factory(*_TRANSNEXT, 'transnext_tiny', folder='classification'),
    'transnext_small': _factory(*_TRANSNEXT, 'transnext_small', folder='classification'),
    'transnext_base': _factory(*_TRANSNEXT, 'transnext_base', folder='classification'),
}


def check_request(variants: List[str], repo: Optional[str]) -> None:
    """Raises a ValueError that says what to pass where the variants or the checkout cannot be timed: before
    anything is built."""
    if not variants:
        raise ValueError('name the attnzoo variants to time, e.g. `official crossformer_tiny --official-repo DIR`')
    unknown = [name for name in variants if name not in OFFICIAL_BUILDS]
    if unknown:
        raise ValueError(f'no official build known for {", ".join(unknown)}; tools/benchlib/official.py knows '
                         f'{", ".join(OFFICIAL_BUILDS)}')
    repos = sorted({OFFICIAL_BUILDS[name].repo for name in variants})
    if len(repos) > 1:
        raise ValueError(f'one official checkout per run, but {", ".join(variants)} come from {", ".join(repos)}; '
                         f'run the families one at a time')
    build = OFFICIAL_BUILDS[variants[0]]
    if not repo:
        raise ValueError(f'--official-repo: pass a local checkout of {build.repo}')
    root = Path(repo)
    if not root.is_dir():
        raise ValueError(f'--official-repo {repo}: no such folder; pass a local checkout of {build.repo}')
    missing = sorted({str(OFFICIAL_BUILDS[name].source) for name in variants
                      if not (root / OFFICIAL_BUILDS[name].source).is_file()})
    if missing:
        raise ValueError(f'--official-repo {repo}: no {", ".join(missing)} there; pass the top folder of a checkout '
                         f'of {build.repo}')


@contextlib.contextmanager
def official_imports(folder: Path):
    """Imports from ``folder`` of an official checkout, first on ``sys.path``, and leaves the process as it found it.

    Official repositories name their top-level modules generically (``models``, ``ops``, ``utils``): modules of
    those names imported before are set aside meanwhile and put back after, and the checkout's own leave
    ``sys.modules`` again (a model keeps what its code imported). Their ``@register_model`` functions are not
    registered with timm: BiFormer's and TransNeXt's official names are attnzoo's own (``biformer_tiny``),
    which they would replace for the rest of the process.
    """
    from timm import models as timm_models
    from timm.models import _registry
    with warnings.catch_warnings():   # timm's deprecated alias, imported now so that it is patched with the rest
        warnings.simplefilter('ignore')
        from timm.models import registry as registry_alias
    local = {p.stem for p in folder.iterdir() if p.suffix == '.py' or (p / '__init__.py').is_file() or
             (p.is_dir() and any(p.glob('*.py')))}

    def is_local(name):
        return name.split('.')[0] in local
    set_aside = {name: module for name, module in sys.modules.items() if is_local(name)}
    for name in set_aside:
        del sys.modules[name]
    sys.path.insert(0, str(folder))
    try:
        with contextlib.ExitStack() as stack:
            for module in (timm_models, _registry, registry_alias):
                stack.enter_context(mock.patch.object(module, 'register_model', lambda fn: fn))
            yield
    finally:
        sys.path.remove(str(folder))
        for name in [name for name in sys.modules if is_local(name)]:
            del sys.modules[name]
        sys.modules.update(set_aside)


def build_official(variant: str, repo: str) -> torch.nn.Module:
    """The official model of ``variant``, built by the checkout ``repo``."""
    import importlib
    build = OFFICIAL_BUILDS[variant]
    with official_imports(Path(repo, build.folder)):
        module = importlib.import_module(build.module)
        builder = getattr(module, build.builder, None)
        if builder is None:
            raise ValueError(f'--official-repo {repo}: {build.source} has no {build.builder}; pass a checkout of '
                             f'{build.repo}')
        return builder(**build.kwargs)


def jitter_parameters(model: torch.nn.Module, seed: int, scale: float = 0.02) -> None:
    """Adds ``scale`` x N(0, 1) to every floating-point parameter, in place (buffers, e.g. a norm's running
    variance, are left as the init made them)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.is_floating_point():
                param.add_(torch.randn(param.shape, generator=gen).to(param) * scale)


def same_weights(variant: str, repo: str, seed: int = 0):
    """(official model, attnzoo model) of ``variant`` in eval mode with the same weights: the official random
    init, jittered, through the family's checkpoint filter, loaded strictly."""
    import timm
    import attnzoo.backbones  # noqa: F401  registers the attnzoo families
    from attnzoo.backbones._families import checkpoint_filter_of
    torch.manual_seed(seed)
    official = build_official(variant, repo).eval()
    jitter_parameters(official, seed)
    ours = timm.create_model(variant).eval()
    ours.load_state_dict(checkpoint_filter_of(variant)(official.state_dict(), ours))
    return official, ours


def output_difference(official, ours, x) -> float:
    """max |attnzoo - official| over max |official| of the two models' outputs on ``x``; a ValueError where the
    outputs differ in shape or beyond float rounding (:data:`OUTPUT_RTOL`), since then a ratio would compare
    different computations."""
    with torch.inference_mode():
        expected, got = official(x), ours(x)
    if got.shape != expected.shape:
        raise ValueError(f'the official model gives {tuple(expected.shape)}, attnzoo {tuple(got.shape)}')
    scale = expected.abs().max().item()
    difference = (got - expected).abs().max().item() / max(scale, 1e-12)
    if not difference <= OUTPUT_RTOL:   # also NaN
        raise ValueError(f'the outputs differ: max |attnzoo - official| is {difference:.3g} of max |official| '
                         f'({scale:.3g}), above {OUTPUT_RTOL:g}: not the same computation, so no ratio is timed')
    return difference


def time_variant(variant: str, repo: str, batch: int, warmup: int, iters: int, repeats: int,
                 progress=None) -> List[Result]:
    """The official and attnzoo rows of one variant (see the module's docstring for how they are timed)."""
    import timm
    official, ours = same_weights(variant, repo)
    size = tuple(timm.models.get_pretrained_cfg(variant).input_size)
    x = torch.randn(batch, *size, generator=torch.Generator().manual_seed(0))
    difference = output_difference(official, ours, x)

    def forward(model):
        def call():
            with torch.inference_mode():
                model(x)
        return call

    calls = {'official': forward(official), 'attnzoo': forward(ours)}
    walls, cpus = [], []   # per repeat: {impl: median ms}
    for repeat in range(repeats):
        order = list(calls) if repeat % 2 == 0 else list(calls)[::-1]
        wall, cpu = time_interleaved({name: calls[name] for name in order}, warmup, iters, progress)
        walls.append(wall)
        cpus.append(cpu)
    case = f'{variant} @{size[1]}x{size[2]} b{batch}'
    rows = []
    for impl, model in (('official', official), ('attnzoo', ours)):
        row = Result(SECTION, case, impl, 'fwd', 'float32', ms=statistics.median(wall[impl] for wall in walls),
                     extra={'cpu_ms': statistics.median(cpu[impl] for cpu in cpus), 'variant': variant,
                            'params': sum(p.numel() for p in model.parameters()),
                            'official_build': OFFICIAL_BUILDS[variant].describe(), 'max_rel_difference': difference})
        rows.append(row)
    attnzoo_row = rows[-1]
    for clock, per_repeat in (('wall', walls), ('cpu', cpus)):
        ratios = [times['attnzoo'] / times['official'] for times in per_repeat]
        attnzoo_row.extra.update({f'time_vs_official_{clock}': statistics.median(ratios),
                                  f'time_vs_official_{clock}_per_repeat': ratios})
    attnzoo_row.speedup_vs_baseline = 1 / attnzoo_row.extra['time_vs_official_wall']
    return rows


def run(variants, repo, batch, warmup, iters, repeats, progress=None) -> List[Result]:
    results = []
    for variant in variants:
        if progress is not None:
            progress.set_postfix_str(variant)
        results += time_variant(variant, repo, batch, warmup, iters, repeats, progress)
    return results


def _spread(values):
    return f'{min(values):.3f}-{max(values):.3f}'


def table(results: List[Result], baseline_of=None) -> str:
    """One row per variant: attnzoo / official from CPU time and from wall time, with the repeats' range, both
    medians, the outputs' difference, both parameter counts."""
    lines = ['| case | official build | attnzoo / official (CPU) | per repeat | attnzoo / official (wall) | per repeat '
             '| ms official / attnzoo (CPU) | ms official / attnzoo (wall) | max rel. output diff '
             '| params official / attnzoo |',
             '|---|---|---:|---|---:|---|---:|---:|---:|---|']
    rows = {(r.case, r.impl): r for r in results}
    for case in dict.fromkeys(r.case for r in results):
        official, ours = rows[case, 'official'], rows[case, 'attnzoo']
        e = ours.extra
        lines.append(f'| {case} | {e["official_build"]} | {e["time_vs_official_cpu"]:.3f} '
                     f'| {_spread(e["time_vs_official_cpu_per_repeat"])} | {e["time_vs_official_wall"]:.3f} '
                     f'| {_spread(e["time_vs_official_wall_per_repeat"])} '
                     f'| {official.extra["cpu_ms"]:.1f} / {e["cpu_ms"]:.1f} | {official.ms:.1f} / {ours.ms:.1f} '
                     f'| {_fmt(e["max_rel_difference"], ".1e")} | {official.extra["params"]:,} / {e["params"]:,} |')
    return '\n'.join(lines)


LEGEND = ('attnzoo against the official code with the same weights (the official random init, jittered, through the '
          'family\'s checkpoint_filter_fn), eval, inference mode, one process: the two models called in turns, '
          '--iters rounds per repeat, the order swapped every repeat. "attnzoo / official" is the median over the '
          'repeats of the ratio of their medians (< 1: attnzoo is faster), "per repeat" the range of the repeats\' '
          'ratios. With one thread the process\'s CPU time is its latency on an idle machine; on a shared one the '
          'other processes\' load inflates wall time, not CPU time, so the CPU ratio is the one to go by there. '
          'The outputs agreed (max |difference| over max |official|) before any timing.')


def plot(results: List[Result], section, path, title) -> None:
    """attnzoo / official per variant (wall and CPU time), the repeats' range as error bars; 1 = parity."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    rows = [r for r in results if r.impl == 'attnzoo']
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(rows) + 2), 4.5))
    width = 0.38
    for offset, clock in ((-width / 2, 'wall'), (width / 2, 'cpu')):
        values = [r.extra[f'time_vs_official_{clock}'] for r in rows]
        repeats = [r.extra[f'time_vs_official_{clock}_per_repeat'] for r in rows]
        errors = [[v - min(rep) for v, rep in zip(values, repeats)], [max(rep) - v for v, rep in zip(values, repeats)]]
        bars = ax.bar([i + offset for i in range(len(rows))], values, width, yerr=errors, capsize=3,
                      label=f'{clock} time')
        ax.bar_label(bars, fmt='%.3f', fontsize=7, padding=2)
    ax.axhline(1.0, color='black', linewidth=0.8)
    ax.set_xticks(range(len(rows)), [r.case for r in rows], rotation=20, fontsize=7, ha='right')
    ax.set_ylabel('attnzoo / official time (lower is better)')
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
