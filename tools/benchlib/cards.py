"""The generated parts of the model cards and of the README, and the zoo plot.

Every card (model_cards/<family>.md) has the same generated blocks, each between a pair of markers:

    front matter        Hugging Face model-card metadata (library_name, license, tags, datasets), at the top
    <!-- attnzoo:begin numbers -->     the paper's top-1 beside attnzoo's measured params / GMACs / throughput
    <!-- attnzoo:begin configs -->     the det / seg configs in configs/<family>/
    <!-- attnzoo:begin citation -->    the BibTeX

and README.md has the zoo table (``<!-- attnzoo:begin zoo -->``) and the pretrained-weights table
(``<!-- attnzoo:begin weights -->``: where ``pretrained=True`` takes each variant's weights from, read from its
``pretrained_cfg``). The facts come from benchlib.zoo, the
figures from the code (params and GMACs, deterministic: counted here) and from the committed results of
``tools/benchmark.py models --family all`` (throughput: model_cards/benchmarks/<device>-models-zoo.json).
Everything between markers is overwritten; everything else in a card is written by hand.
"""
import json
import math
import re
from pathlib import Path
from urllib.parse import urlparse

from . import zoo
from .harness import model_gmacs

ROOT = Path(__file__).resolve().parents[2]
ZOO_TAG = 'zoo'
WEIGHTS_TAG = 'weights'
TASKS = {   # config file name prefix -> (task, method)
    'cascade-mask-rcnn': ('detection', 'Cascade Mask R-CNN'),
    'mask-rcnn': ('detection', 'Mask R-CNN'),
    'retinanet': ('detection', 'RetinaNet'),
    'upernet': ('segmentation', 'UPerNet'),
    'fpn': ('segmentation', 'Semantic FPN'),
}
DATASET_NAMES = {'coco': 'COCO', 'ade20k': 'ADE20K'}
PRETRAIN = {'in1k': '', 'in22k': ' (IN-22k pre-trained)'}


def marker(name, end=False):
    return f'<!-- attnzoo:{"end" if end else "begin"} {name} -->'


def replace_block(text, name, body, where):
    """``text`` with what lies between the ``name`` markers replaced by ``body``."""
    begin, end = marker(name), marker(name, end=True)
    if text.count(begin) != 1 or text.count(end) != 1:
        raise ValueError(f'{where}: needs exactly one {begin} and one {end} line around its generated '
                         f'{name} block (found {text.count(begin)} / {text.count(end)}); add them where the '
                         'block belongs and run `python tools/benchmark.py cards` again')
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f'{head}{begin}\n{body.strip()}\n{end}{tail}'


def block(text, name):
    """What lies between the ``name`` markers of ``text`` (None without them)."""
    match = re.search(re.escape(marker(name)) + r'\n(.*?)' + re.escape(marker(name, end=True)), text, re.S)
    return match.group(1) if match else None


# ---------------------------------------------------------------------------------------------- figures

def static_figures(names, progress=None):
    """{name: {'params': int, 'gmacs': float, 'size': (H, W), 'license': str}}: counted on the meta device
    (parameters) and by the harness's FLOP counter at the default input size (GMACs)."""
    import timm
    import torch
    import attnzoo.backbones  # noqa: F401  registers the attnzoo families
    figures = {}
    for name in names:
        if progress is not None:
            progress.set_postfix_str(name)
        with torch.device('meta'):
            model = timm.create_model(name)
        size = tuple(model.pretrained_cfg['input_size'][1:])
        figures[name] = dict(params=sum(p.numel() for p in model.parameters()), size=size,
                             license=model.pretrained_cfg.get('license'),
                             gmacs=model_gmacs(name, size))
        if progress is not None:
            progress.update(1)
    return figures


def configs_by_variant(root=ROOT):
    """{variant: [(path relative to root, task, method, dataset)]} for every config naming a model_name."""
    found = {}
    for path in sorted((root / 'configs').glob('*/*.py')):
        match = re.search(r"model_name\s*=\s*'([^']+)'", path.read_text())
        if not match:
            continue
        prefix = next((p for p in TASKS if path.name.startswith(p + '_')), None)
        if prefix is None:
            raise ValueError(f'{path}: the config name does not start with a known method '
                             f'({", ".join(TASKS)}); name it as mmdet / mmseg do')
        dataset = next((label for key, label in DATASET_NAMES.items() if key in path.name), '?')
        found.setdefault(match.group(1), []).append((path.relative_to(root).as_posix(), *TASKS[prefix], dataset))
    return found


def zoo_runs(results_dir):
    """The committed zoo runs, CPU first: [(header, {variant: row})] from <device>-models-zoo.json files."""
    runs = []
    for path in sorted(Path(results_dir).glob(f'*-models-{ZOO_TAG}.json')):
        report = json.loads(path.read_text())
        rows = {r['impl']: r for r in report['results'] if r['mode'] == 'fwd'}
        runs.append(({**report, 'file': path.name}, rows))
    return sorted(runs, key=lambda run: not run[0]['device'].startswith('CPU'))


def license_of(fam, figures):
    licenses = {figures[name]['license'] for name in fam.variant_names()}
    if len(licenses) != 1 or None in licenses:
        raise ValueError(f'{fam.title}: the variants\' pretrained_cfg licenses disagree or are missing '
                         f'({licenses}); set one license per family in its default_cfgs')
    return licenses.pop()


# ------------------------------------------------------------------------------------------------- text

def front_matter(fam, figures):
    datasets = sorted({d for v in fam.variants for d in zoo.DATASETS[v.pretrain]}, key=lambda d: d != 'imagenet-1k')
    tags = ['image-classification', 'timm', 'attnzoo', 'vision-transformer', *fam.tags]
    lines = ['---', 'library_name: timm', f'license: {license_of(fam, figures)}', 'tags:']
    lines += [f'- {tag}' for tag in tags]
    lines += ['datasets:'] + [f'- {d}' for d in datasets]
    lines += ['pipeline_tag: image-classification', '---']
    return '\n'.join(lines) + '\n'


def _top1(variant, source='paper'):
    if variant.top1 is None:
        return '-'
    return f'{variant.top1:g}{PRETRAIN[variant.pretrain]}'


def _throughput(row):
    if row is None:
        return 'not run'
    if row.get('error'):
        return 'not timed' if row['error'].startswith('not timed') else 'failed'
    return f'{row["extra"]["img_per_s"]:.3g}'


def _run_note(header, rows):
    load = header.get('load_average_at_start'), header.get('load_average_at_end')
    load_text = ''
    if all(load):
        load_text = (f'; load average (1, 5, 15 min) {", ".join(f"{x:.1f}" for x in load[0])} at the start, '
                     f'{", ".join(f"{x:.1f}" for x in load[1])} at the end')
    threads = header.get('threads')
    baseline = next((r for r in rows.values() if not r['extra'].get('family') and r.get('ms')), None)
    baseline_text = f'; baseline {baseline["impl"]} {_throughput(baseline)} img/s' if baseline else ''
    return (f'**{header["device"]}**: {header["date"]}, torch {header["torch"]}, {header.get("dtype", "fp32")}, '
            f'batch {header.get("batch")}, forward only, {threads} thread{"" if threads == 1 else "s"}, median of '
            f'up to {header.get("iters")} timed calls after {header.get("warmup")} warm-up{baseline_text}{load_text} '
            f'([{header["file"]}](benchmarks/{header["file"]}))')


def numbers_block(fam, figures, runs):
    runs = runs or []
    head = ['variant', f'top-1 ({fam.top1_source})', 'at', 'params (attnzoo)', 'GMACs (attnzoo)']
    head += [f'img/s, {h["device"]}' for h, _ in runs] or ['img/s']
    lines = ['| ' + ' | '.join(head) + ' |', '|---|' + '---:|' * (len(head) - 1)]
    for v in fam.variants:
        fig = figures[v.name]
        cells = [f'`{v.name}`', _top1(v), str(v.resolution), f'{fig["params"]:,}',
                 f"{fig['gmacs']:.3f} @{fig['size'][0]}"]
        cells += [_throughput(rows.get(v.name)) for _, rows in runs] or ['not measured']
        lines.append('| ' + ' | '.join(cells) + ' |')
    notes = ['',
             f'The top-1 column is ImageNet-1k top-1 as the {fam.top1_source} reports it, at the resolution in '
             '"at" (not re-evaluated here: no ImageNet on the development machine). Params and GMACs are '
             "attnzoo's, measured by `tools/benchmark.py` (parameters counted on the meta device with the "
             '1000-class head; multiply-adds of one forward pass at the default input size, '
             '`torch.utils.flop_counter`, attention counted through its explicit path). Attention runs on '
             + (f'attnzoo\'s fused `{fam.kernel}` op (`attnzoo.kernels`)' if fam.kernel else
                'plain PyTorch (no attnzoo kernel)') + '. Official code: '
             + (fam.official_repo or 'none was released') + (f'; the model is timm\'s (`{fam.module}`).'
                                                             if fam.timm_native else '.')]
    if runs:
        notes += ['', 'Throughput (images / s, batch 1, fp32), each column from one run of '
                  '`python tools/benchmark.py models --family all`:', '']
        notes += [f'- {_run_note(header, rows)}' for header, rows in runs]
        if any(h['device'].startswith('CPU') for h, _ in runs):
            notes += ['', 'The CPU figures come from a 2-core machine shared with other work, so they are noisy '
                      '(model_cards/benchmarks/README.md, "The zoo at a glance"): compare variants within a column, '
                      'not with other machines.']
        if any(_throughput(rows.get(name)) == 'not timed' for _, rows in runs for name in fam.variant_names()):
            notes += ['', '"not timed": above the run\'s `--max-gmacs`.']
    if not any(not h['device'].startswith('CPU') for h, _ in runs):
        notes += ['', 'GPU: no GPU run exists yet (`python tools/benchmark.py models --family all` on a GPU adds '
                  'its column).']
    return '\n'.join(lines + notes)


def configs_block(fam, configs):
    rows = [(path, task, method, dataset, name) for name in fam.variant_names() for path, task, method, dataset
            in configs.get(name, [])]
    if not rows:
        return f'No OpenMMLab configs in `configs/{fam.card}/` yet.'
    lines = ['| config | task | method | dataset | variant |', '|---|---|---|---|---|']
    lines += [f'| [`{Path(path).name}`](../{path}) | {task} | {method} | {dataset} | `{name}` |'
              for path, task, method, dataset, name in rows]
    return '\n'.join(lines)


def citation_block(fam):
    return f'```bibtex\n{fam.citation}\n```'


def config_summary(configs_of_variant):
    det = sorted({method for _, task, method, _ in configs_of_variant if task == 'detection'})
    seg = sorted({method for _, task, method, _ in configs_of_variant if task == 'segmentation'})
    return ' / '.join([', '.join(det) or '-', ', '.join(seg) or '-']) if det or seg else '-'


def zoo_table(figures, configs):
    lines = ['| family | variant | params (M) | GMACs | top-1 as the paper reports it | fused kernel '
             '| configs (det / seg) | card |', '|---|---|---:|---:|---:|---|---|---|']
    for fam in zoo.FAMILIES:
        kernel = f'`{fam.kernel}`' if fam.kernel else '-'
        for v in fam.variants:
            fig = figures[v.name]
            top1 = '-' if v.top1 is None else f'{_top1(v)} @{v.resolution}'
            lines.append(f'| {fam.title} | `{v.name}` | {fig["params"] / 1e6:.2f} '
                         f'| {fig["gmacs"]:.2f} @{fig["size"][0]} '
                         f'| {top1} | {kernel} | {config_summary(configs.get(v.name, []))} '
                         f'| [{fam.card}](model_cards/{fam.card}.md) |')
    lines += ['', 'Params and GMACs (multiply-adds at the default input size, 1000-class head) are measured on '
              'attnzoo\'s code by `tools/benchmark.py`; top-1 is ImageNet-1k as each paper (or official README) '
              'reports it, not re-evaluated. Fused kernel: the `attnzoo.kernels` op the family runs on ("-": '
              'plain PyTorch attention, `F.scaled_dot_product_attention` where the family uses it). '
              'timm\'s HaloNets are timm\'s own designs, not the paper\'s H0-H7: '
              'no paper top-1 belongs to them. Throughput is in each card and in the plot '
              '[model_cards/benchmarks/](model_cards/benchmarks/README.md#the-zoo-at-a-glance).']
    return '\n'.join(lines)


# hosts whose links are web pages for a person (a download button), not files: timm would fetch the HTML;
# the families that publish there refuse pretrained=True without a file (backbones/_checkpoint.py,
# require_downloadable_weights). api.onedrive.com's /root/content links are files (BiFormer's).
SHARE_PAGE_HOSTS = ('drive.google.com', 'pan.baidu.com', 'cloud.tsinghua.edu.cn', '1drv.ms', 'onedrive.live.com')
# what pretrained=True does for each kind of source, and how to use the weights without a download
WEIGHT_SOURCES = {
    'hub': ('downloads (Hugging Face Hub)', 'a copy of the file, loaded as below'),
    'url': ('downloads (the URL)', 'a copy of the file, loaded as below'),
    'share-page': ('refuses, naming the page', 'download the file from the page, then load it as below'),
    'tensorflow': ('refuses, naming the archive', 'download and unpack the TensorFlow archive, convert it: '
                   '`python tools/convert.py <unpacked prefix> --model <variant> -o <variant>.safetensors`, '
                   'then load that file as below'),
    'none': ('no official weights', 'train it (`tools/train.py`)'),
}


def weight_source(name):
    """(kind, where) of the weights ``pretrained=True`` loads for ``name``, by its pretrained_cfg: a Hugging
    Face Hub repository, a file URL, a share page (SHARE_PAGE_HOSTS), a TensorFlow archive (``.tar.gz``, which
    timm cannot read) or none."""
    import timm
    import attnzoo.backbones  # noqa: F401  registers the attnzoo families
    cfg = timm.get_pretrained_cfg(name)
    if cfg.hf_hub_id:
        return 'hub', f'`huggingface.co/{cfg.hf_hub_id.split("/")[0]}`'
    url = cfg.url[0] if isinstance(cfg.url, (tuple, list)) else cfg.url   # timm also takes (url, file name)
    if not url:
        return 'none', '-'
    host = f'`{urlparse(url).netloc}`'
    if url.endswith('.tar.gz'):
        return 'tensorflow', host
    if urlparse(url).netloc in SHARE_PAGE_HOSTS:
        return 'share-page', host
    return 'url', host


def weights_table():
    """README's pretrained-weights table: per family (and per kind of source where a family's variants differ)
    what ``pretrained=True`` does, where the weights are, and how to load them offline."""
    lines = ['| family | variants | `pretrained=True` | weights at | offline, or where timm cannot download |',
             '|---|---|---|---|---|']
    for fam in zoo.FAMILIES:
        groups = {}
        for name in fam.variant_names():
            kind, where = weight_source(name)
            groups.setdefault(kind, ([], []))
            groups[kind][0].append(name)
            if where not in groups[kind][1]:
                groups[kind][1].append(where)
        for kind, (names, wheres) in groups.items():
            listed = f'all {len(names)}' if len(groups) == 1 else ', '.join(f'`{n}`' for n in names)
            does, offline = WEIGHT_SOURCES[kind]
            lines.append(f'| {fam.title} | {listed} | {does} | {", ".join(wheres)} | {offline} |')
    lines += ['', 'Generated by `python tools/benchmark.py cards` from each variant\'s `pretrained_cfg` (the URL or '
              'Hugging Face repository `pretrained=True` reads). A downloaded or converted file loads with '
              "`timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file='file.pth'))`, "
              '`tools/train.py --pretrained-file file.pth`, or `AttnzooBackbone(checkpoint=\'file.pth\')` in a '
              "config, through the family's `checkpoint_filter_fn` (official `.pth` files as published); "
              '`tools/convert.py` turns any of them into a safetensors file once. The licenses of the weights are '
              'in each card.']
    return '\n'.join(lines)


def set_front_matter(text, body):
    if text.startswith('---\n'):
        end = text.index('\n---\n', 4) + len('\n---\n')
        text = text[end:]
    return body + text


def regenerate(results_dir, root=ROOT, figures=None, progress=None):
    """Rewrite every card's generated blocks and README's zoo and weights tables; returns the files written.
    ``figures``: what static_figures gives, for the variants already counted (the rest are counted here)."""
    figures = dict(figures or {})
    missing = [v.name for v in zoo.all_variants() if v.name not in figures]
    if progress is not None:
        progress.total = len(missing)
        progress.refresh()
    figures.update(static_figures(missing, progress=progress))
    configs = configs_by_variant(root)
    runs = zoo_runs(results_dir)
    written = []
    for fam in zoo.FAMILIES:
        path = root / 'model_cards' / f'{fam.card}.md'
        if not path.exists():
            raise FileNotFoundError(f'{path}: every family in tools/benchlib/zoo.py needs a card; start it from '
                                    'another family\'s card (the markers are what the generator needs)')
        text = set_front_matter(path.read_text(), front_matter(fam, figures))
        text = replace_block(text, 'numbers', numbers_block(fam, figures, runs), path)
        text = replace_block(text, 'configs', configs_block(fam, configs), path)
        text = replace_block(text, 'citation', citation_block(fam), path)
        path.write_text(text)
        written.append(path)
    readme = root / 'README.md'
    text = replace_block(readme.read_text(), ZOO_TAG, zoo_table(figures, configs), readme)
    readme.write_text(replace_block(text, WEIGHTS_TAG, weights_table(), readme))
    written.append(readme)
    return written


# ------------------------------------------------------------------------------------------------- plot

def zoo_points(rows):
    """{family title: [(img/s, top-1, params in M, name)]} of the variants with a paper top-1 and a time in
    ``rows`` (one zoo run), and the names of the others."""
    points, left_out = {}, []
    for fam in zoo.FAMILIES:
        for v in fam.variants:
            row = rows.get(v.name)
            if v.top1 is None or row is None or not row.get('ms'):
                left_out.append(v.name)
                continue
            points.setdefault(fam.title, []).append((row['extra']['img_per_s'], v.top1, row['extra']['params_m'], v.name))
    return points, left_out


def pareto_front(points):
    """The points that no other point beats in both throughput and top-1 (at least as good in both, better
    in one), by increasing throughput: the best top-1 to be had at each speed."""
    best = sorted(points, key=lambda p: (-p[0], -p[1]))   # fastest first; equal speed: better top-1 first
    front, top = [], -math.inf
    for point in best:
        if point[1] > top:
            front.append(point)
            top = point[1]
    return front[::-1]


def labelled_names(points):
    """The variants the zoo plot names: the Pareto front, and the smallest and largest (parameters) of each
    family."""
    names = {p[3] for p in pareto_front([p for family in points.values() for p in family])}
    for family in points.values():
        names |= {min(family, key=lambda p: p[2])[3], max(family, key=lambda p: p[2])[3]}
    return names


# where a name may sit around its point (offset in points, text alignment), tried in order until one
# overlaps nothing: beside the point first, then further out along eight directions
_DIRECTIONS = [((1, 1), 'left', 'bottom'), ((1, -1), 'left', 'top'), ((-1, 1), 'right', 'bottom'),
               ((-1, -1), 'right', 'top'), ((0, 1), 'center', 'bottom'), ((0, -1), 'center', 'top'),
               ((1, 0), 'left', 'center'), ((-1, 0), 'right', 'center')]
_LABEL_PLACES = [((dx * r, dy * r), ha, va) for r in (4, 12, 20, 30, 42, 56) for (dx, dy), ha, va in _DIRECTIONS]


def _place_labels(ax, fig, labels, markers):
    """Annotates each (x, y, name) of ``labels`` at the place of _LABEL_PLACES whose text box, inside the axes,
    overlaps the fewest markers (``markers``: (x, y, area in points^2)) and names placed before (the first
    such place); a thin line joins each name to its point."""
    from matplotlib.text import Text
    from matplotlib.transforms import Bbox
    renderer = fig.canvas.get_renderer()
    inside = ax.get_window_extent(renderer)
    pixels_per_point = fig.dpi / 72
    taken = []
    for x, y, area in markers:
        cx, cy = ax.transData.transform((x, y))
        r = 0.8 * math.sqrt(area) / 2 * pixels_per_point
        taken.append(Bbox.from_extents(cx - r, cy - r, cx + r, cy + r))

    def clashes(box):
        if not (inside.contains(box.x0, box.y0) and inside.contains(box.x1, box.y1)):
            return math.inf
        return sum(box.overlaps(other) for other in taken)

    for x, y, name in sorted(labels, key=lambda label: -label[1]):
        best = None
        for offset, ha, va in _LABEL_PLACES:
            text = ax.annotate(name, (x, y), xytext=offset, textcoords='offset points', fontsize=6.5, ha=ha, va=va,
                               arrowprops=dict(arrowstyle='-', lw=0.4, color='0.35', shrinkA=0, shrinkB=2))
            text.update_positions(renderer)
            box = Text.get_window_extent(text, renderer).expanded(1.04, 1.2)   # the text alone, not its line
            score = clashes(box)
            if best is not None and score >= best[0]:
                text.remove()
                continue
            if best is not None:
                best[1].remove()
            best = (score, text, box)
            if score == 0:
                break
        taken.append(best[2])


def _marker_area(params_m):
    return 6 + 1.5 * params_m     # points^2, proportional to the parameter count


def plot_zoo(rows, path, title):
    """Throughput (log x) against the paper's top-1, marker area proportional to params, one colour per
    family. Every timed variant with a paper top-1 is a point; the Pareto front (a dashed line) and each
    family's smallest and largest variant are named, the other points' names are listed under the plot
    (all are in the README's zoo table); variants without a paper top-1 or a time are listed too."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(12, 8.5))
    tab20 = plt.get_cmap('tab20').colors
    colours = tab20[::2] + tab20[1::2]          # the ten strong colours first, then their light shades
    markers = 'os^DvPXp<>h'
    points, left_out = zoo_points(rows)
    named = labelled_names(points)
    for index, fam in enumerate(zoo.FAMILIES):
        if fam.title not in points:
            continue
        xs, ys, params, _ = zip(*points[fam.title])
        ax.scatter(xs, ys, s=[_marker_area(p) for p in params], color=colours[index % len(colours)], alpha=0.6,
                   marker=markers[index % len(markers)], edgecolors='black', linewidths=0.5, label=fam.title)
    front = pareto_front([p for family in points.values() for p in family])
    ax.step([p[0] for p in front], [p[1] for p in front], where='post', color='0.3', linestyle='--', linewidth=0.8,
            label='Pareto front (no variant is both faster and better)')
    ax.set_xscale('log')
    ax.set_xlabel('images / s (batch 1, fp32, forward; log scale)')
    ax.set_ylabel('ImageNet-1k top-1 as the paper reports it (%)')
    ax.grid(True, which='both', alpha=0.3)
    legend = ax.legend(fontsize=7, loc='lower left', markerscale=0.5)
    for handle in legend.legend_handles:
        if hasattr(handle, 'set_sizes'):
            handle.set_sizes([30])
    ax.set_title(title + '\nnamed: the Pareto front and the smallest / largest variant of each family', fontsize=9)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    every = [p for family in points.values() for p in family]
    _place_labels(ax, fig, [(p[0], p[1], p[3]) for p in every if p[3] in named],
                  [(p[0], p[1], _marker_area(p[2])) for p in every])
    unnamed = [f'{family_title}: ' + ', '.join(p[3] for p in sorted(family, key=lambda p: p[2]) if p[3] not in named)
               for family_title, family in points.items() if any(p[3] not in named for p in family)]
    notes = ['Points not named (by size): ' + '; '.join(unnamed) + '.'] if unnamed else []
    if left_out:
        notes.append('Not shown (no paper top-1, or not timed): ' + ', '.join(left_out) + '.')
    notes.append("Every variant's numbers: the README's zoo table and the cards.")
    fig.text(0.01, 0.005, '\n'.join(notes), fontsize=6.5, wrap=True, va='bottom')
    fig.savefig(path, dpi=120)
    plt.close(fig)
