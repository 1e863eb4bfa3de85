"""setup.py's timm floor is the oldest timm attnzoo runs on: with that release attnzoo.backbones (every
family) imports and builds a model; with the release before it (where its wheel is at hand) it does not.

Offline: the timm wheels come from a local folder (``$ATTNZOO_WHEELS``, default ``~/.cache/attnzoo/wheels``;
fill it with ``pip download timm==X --no-deps -d DIR``); the test skips, saying so, without the floor's
wheel. Each release runs in a subprocess with the wheel unpacked first on its path (timm is pure Python).
"""
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WHEELS = Path(os.environ.get('ATTNZOO_WHEELS', Path.home() / '.cache' / 'attnzoo' / 'wheels'))
TIMM_FLOOR = re.search(r"'timm>=([\d.]+)'", (ROOT / 'setup.py').read_text()).group(1)
# import the package (every family registers on import) and build a model (on the meta device: no weights)
IMPORT_AND_BUILD = """
import timm, torch
assert timm.__version__ == {version!r}, timm.__file__
import attnzoo.backbones
with torch.device('meta'):
    timm.create_model('biformer_tiny', features_only=True)
"""


def version_key(version):
    return tuple(int(part) for part in re.findall(r'\d+', version))


def timm_wheels():
    """{version: wheel path} of the timm wheels in WHEELS."""
    return {path.name.split('-')[1]: path for path in WHEELS.glob('timm-*-py3-none-any.whl')}


def runs_on(wheel, version, tmp_path):
    """Whether attnzoo imports and builds a model with the timm of ``wheel``; (ok, output)."""
    target = tmp_path / version
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(target)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(target), os.environ.get('PYTHONPATH', '')]))
    result = subprocess.run([sys.executable, '-c', IMPORT_AND_BUILD.format(version=version)], env=env,
                            capture_output=True, text=True, timeout=600)
    return result.returncode == 0, result.stderr[-2000:]


def test_timm_floor_is_the_oldest_release_that_runs(tmp_path):
    wheels = timm_wheels()
    if TIMM_FLOOR not in wheels:
        pytest.skip(f'no timm-{TIMM_FLOOR} wheel in {WHEELS} (setup.py asks timm>={TIMM_FLOOR}); '
                    f'`pip download timm=={TIMM_FLOOR} --no-deps -d {WHEELS}` to run this check')
    ok, output = runs_on(wheels[TIMM_FLOOR], TIMM_FLOOR, tmp_path)
    assert ok, f'attnzoo does not run on timm {TIMM_FLOOR}, the floor in setup.py:\n{output}'
    older = sorted((v for v in wheels if version_key(v) < version_key(TIMM_FLOOR)), key=version_key)
    if older:  # the release before the floor must fail, or the floor is too high
        ok, _ = runs_on(wheels[older[-1]], older[-1], tmp_path)
        assert not ok, f'attnzoo runs on timm {older[-1]}: lower the floor in setup.py'
