"""model_cards/benchmarks/: every result file a card or a README names exists, every run in the folder is listed
in its README under one device kind, and a superseded run names the run that supersedes it.

Names are read from the text as written: `benchmarks/<name>` (links and paths) and bare names that start with a
CPU device kind (`cpu-<model>-x<cores>-...`); `{a,b}` is expanded, and a name without a suffix (or with `.*`)
stands for a run's file set.
"""
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / 'model_cards' / 'benchmarks'
README = BENCHMARKS / 'README.md'
DOCUMENTS = ('README.md', 'kernel-cases.md')     # the folder's own text, not results
QUOTING = sorted((ROOT / 'model_cards').glob('*.md')) + [ROOT / 'README.md'] + [BENCHMARKS / d for d in DOCUMENTS]
SUFFIXES = ('.md', '.json', '.csv', '.png')
NAMED = re.compile(r'benchmarks/([\w.{},*-]*[\w}*])'
                   r'|(?<![\w#/.-])(cpu-[a-z0-9]+(?:-[a-z0-9]+)*?-x\d+-[\w.{},*-]*[\w}*])')
sys.path.insert(0, str(ROOT / 'tools'))
from benchlib.provenance import slug  # noqa: E402


def expand(name):
    """'a.{md,json}' -> ['a.md', 'a.json'], one brace group at a time."""
    match = re.search(r'\{([^{}]*)\}', name)
    if not match:
        return [name]
    return [expanded for part in match.group(1).split(',')
            for expanded in expand(name[:match.start()] + part + name[match.end():])]


def named_files(text):
    """Every result name in ``text``: file names, and run stems (no suffix, or '.*')."""
    names = []
    for match in NAMED.finditer(text):
        name = (match.group(1) or match.group(2)).rstrip('.')
        if '*' in name.removesuffix('.*'):   # a pattern ('cpu-x86-64-x2-*'), not a file
            continue
        names += [n.removesuffix('.*') for n in expand(name)]
    return [n for n in names if n and n != 'README.md' and not n.startswith('README.md#')]


def exists(name):
    if name.endswith(SUFFIXES):
        return (BENCHMARKS / name).is_file()
    return any((BENCHMARKS / (name + suffix)).is_file() for suffix in SUFFIXES)


def result_files():
    return sorted(p for p in BENCHMARKS.iterdir() if p.is_file() and p.name not in DOCUMENTS)


def run_of(path):
    return path.name if path.suffix == '.json' and not path.with_suffix('.md').exists() else path.stem


@pytest.mark.parametrize('document', QUOTING, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_benchmarks_file_a_card_or_readme_names_exists(document):
    missing = [name for name in named_files(document.read_text()) if not exists(name)]
    assert not missing, (f'{document.relative_to(ROOT)} names model_cards/benchmarks/ files that do not exist: '
                         f'{missing}; point it to the file that holds the figure (the folder\'s README lists them)')


def test_the_name_reader_sees_links_bare_names_and_sets():
    text = ('see [zoo](benchmarks/cpu-a-x2-models-zoo.json), `cpu-b-x4-models-{dat,moat}.*`, '
            '`cpu-a-x2-cpu-issue9.md`. Old: `cpu-c-x2-*`, anchors README.md#cpu-issue-9-x, attnzoo-cpu-x2-y.')
    assert named_files(text) == ['cpu-a-x2-models-zoo.json', 'cpu-b-x4-models-dat', 'cpu-b-x4-models-moat',
                                 'cpu-a-x2-cpu-issue9.md']
    assert exists('cpu-intel-r-xeon-r-processor-x2-models-zoo') and not exists('cpu-x86-64-x2-models-moat')


def test_every_run_is_listed_in_the_readme_under_a_device_kind():
    """One name per machine kind: every file starts with the device kind (or gpu-check-<kind>) of a device a run
    recorded (a run renamed to its kind's name, ``renamed_from``, may record an older name), and the README names
    every run."""
    kinds = set()
    for path in BENCHMARKS.glob('*.json'):
        report = json.loads(path.read_text())
        for record in report if isinstance(report, list) else [report]:
            if 'device' in record and 'renamed_from' not in record:
                kinds.add(slug(record['device']))
    readme = README.read_text()
    for path in result_files():
        assert any(re.match(rf'(gpu-check-)?{re.escape(kind)}-', path.name) for kind in kinds), \
            f'{path.name}: name it <device kind>-... (tools/benchlib/provenance.py, device_kind; known: {kinds})'
        assert run_of(path) in readme, f'{run_of(path)}: list the run in model_cards/benchmarks/README.md'


def test_a_superseded_run_names_the_run_that_supersedes_it():
    superseded = 0
    for path in BENCHMARKS.glob('*.json'):
        report = json.loads(path.read_text())
        if isinstance(report, dict) and 'superseded_by' in report:
            superseded += 1
            new = report['superseded_by']
            assert (BENCHMARKS / new).is_file(), f'{path.name}: superseded_by {new}, which does not exist'
            note = path.with_suffix('.md').read_text().split('\n\n', 2)[1]
            assert note.startswith('**Superseded** by') and f'({Path(new).with_suffix(".md").name})' in note, note
    assert superseded >= 2
