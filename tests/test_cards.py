"""The model cards and the README's zoo table: every ```python block of every card runs, and every
parameter figure they print equals the code's count (on the meta device: no weights are made).

The snippets are written to run offline on small inputs (the smallest variants, random weights, the
pretrained lines as comments), so running them is what a reader does, minus the download.
"""
import importlib.util
import re
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch

import attnzoo.backbones  # noqa: F401  registers the attnzoo families
from reference_params import OFFICIAL_PARAMS

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / 'tools'))
from benchlib import cards, zoo  # noqa: E402

CARDS = sorted((ROOT / 'model_cards').glob('*.md'))
PYTHON_BLOCK = re.compile(r'^( *)```python\n(.*?)^\1```', re.S | re.M)   # also inside list items


def python_blocks(path):
    return [textwrap.dedent(code) for _, code in PYTHON_BLOCK.findall(path.read_text())]


def meta_params(name):
    with torch.device('meta'):
        model = timm.create_model(name)
    return sum(p.numel() for p in model.parameters())


def table_rows(text):
    """The rows of the first markdown table in ``text`` as {column header: cell}."""
    lines = [line for line in text.splitlines() if line.startswith('|')]
    header = [cell.strip() for cell in lines[0].strip('|').split('|')]
    return [dict(zip(header, (cell.strip() for cell in line.strip('|').split('|')))) for line in lines[2:]]


@pytest.fixture
def one_thread():
    """Snippets run on one thread: on a shared 2-core machine two threads wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize('card', [c for c in CARDS if python_blocks(c)], ids=lambda c: c.stem)
def test_card_snippets_run(card, one_thread, tmp_path, monkeypatch):
    """Each card's python blocks, in order, in one namespace (a later block may use an earlier one's
    names, as a reader would), offline, in an empty folder."""
    if any('attnzoo.heads' in code for code in python_blocks(card)) and importlib.util.find_spec('mmdet') is None:
        pytest.skip('the snippet uses attnzoo.heads, which needs the OpenMMLab stack (the mm extra)')
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    namespace = {'__name__': f'card_{card.stem}'}
    for index, code in enumerate(python_blocks(card)):
        exec(compile(code, f'{card.name}, python block {index + 1}', 'exec'), namespace)


def test_every_zoo_family_has_a_card_and_every_supported_variant_is_in_the_zoo():
    """The zoo lists exactly the variants attnzoo supports (tests/reference_params.py), each at its
    default input size, and every family has a card."""
    assert sorted(v.name for v in zoo.all_variants()) == sorted(OFFICIAL_PARAMS)
    for variant in zoo.all_variants():
        assert timm.get_pretrained_cfg(variant.name).input_size[1:] == (variant.resolution,) * 2, variant
    assert {f'{fam.card}.md' for fam in zoo.FAMILIES} <= {c.name for c in CARDS}


def test_card_and_readme_params_equal_the_code():
    """Every card's generated table names each of its family's variants with the parameter count of the
    code, its front matter the license of the variants' pretrained_cfg; the README's zoo table the same
    counts in millions.

    The code's count of every variant is checked against OFFICIAL_PARAMS by tests/test_models.py
    (test_param_count_matches_official, on the meta device), and the zoo lists exactly those variants
    (the test above), so comparing with OFFICIAL_PARAMS here compares with the code without counting
    the 79 models a second time (about 50 s on two loaded cores)."""
    for fam in zoo.FAMILIES:
        text = (ROOT / 'model_cards' / f'{fam.card}.md').read_text()
        rows = table_rows(cards.block(text, 'numbers') or '')
        printed = {row['variant'].strip('`'): int(row['params (attnzoo)'].replace(',', '')) for row in rows}
        assert printed == {name: OFFICIAL_PARAMS[name] for name in fam.variant_names()}, fam.card
        license_line = re.search(r'^license: (.+)$', text.split('\n---\n', 1)[0], re.M)
        assert license_line and license_line.group(1) == timm.get_pretrained_cfg(fam.variants[0].name).license
    rows = table_rows(cards.block((ROOT / 'README.md').read_text(), 'zoo'))
    readme = {row['variant'].strip('`'): float(row['params (M)']) for row in rows}
    assert readme == {name: round(count / 1e6, 2) for name, count in OFFICIAL_PARAMS.items()}


def test_the_smallest_variant_of_each_family_counts_as_its_card_says():
    """The direct check, on one variant per family (the smallest), counted here on the meta device."""
    for fam in zoo.FAMILIES:
        name = min(fam.variant_names(), key=OFFICIAL_PARAMS.get)
        rows = table_rows(cards.block((ROOT / 'model_cards' / f'{fam.card}.md').read_text(), 'numbers'))
        printed = next(int(r['params (attnzoo)'].replace(',', '')) for r in rows if r['variant'] == f'`{name}`')
        assert printed == meta_params(name), name


TEMPLATE_SECTIONS = ['What it is', 'Numbers', 'Variants', 'Usage', 'Source and license', 'Citation']


@pytest.mark.parametrize('fam', zoo.FAMILIES, ids=lambda fam: fam.card)
def test_every_card_follows_the_template(fam):
    """Front matter first (Hugging Face model-card metadata), the template's sections in order (a family
    adds its own between them), the generated blocks filled, a Usage section with runnable python."""
    text = (ROOT / 'model_cards' / f'{fam.card}.md').read_text()
    front, body = text.split('\n---\n', 1)
    assert front.startswith('---\nlibrary_name: timm\nlicense: ') and '\ndatasets:\n- imagenet-1k' in front
    sections = re.findall(r'^## (.+)$', body, re.M)
    assert [s for s in sections if s in TEMPLATE_SECTIONS] == TEMPLATE_SECTIONS, sections
    for name in ('numbers', 'configs', 'citation'):
        assert (cards.block(text, name) or '').strip(), f'{fam.card}: empty {name} block'
    usage = body.split('\n## Usage\n', 1)[1].split('\n## ', 1)[0]
    assert '```python' in usage


def test_generated_blocks_need_their_markers():
    text = '# card\n<!-- attnzoo:begin numbers -->\nold\n<!-- attnzoo:end numbers -->\nrest\n'
    assert cards.replace_block(text, 'numbers', 'new', 'card.md') == text.replace('old', 'new')
    with pytest.raises(ValueError, match=r'card\.md: needs exactly one <!-- attnzoo:begin configs -->'):
        cards.replace_block(text, 'configs', 'new', 'card.md')
