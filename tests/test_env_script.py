"""tools/env.sh on a fresh machine, with stand-in ``python3`` / ``pip`` commands.

tools/test.sh and tools/demo.sh run ``py=$(bash tools/env.sh ...)`` and then ``"$py" ...``: env.sh's
stdout must be the python path and nothing else, whatever its install steps print. A real fresh
install takes the better part of an hour (mmcv is compiled), so these tests run env.sh's real code
path (the shell scripts, copied with the files they read into a temporary clone) against stand-in
``python3`` and venv ``python`` executables that do what the real ones do to the file system (create
the venv, write the mmcv wheel) and chatter on stdout as pip does ("Successfully built mmcv").
"""
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLONE_FILES = ('setup.py', 'tools/env.sh', 'tools/test.sh', 'tools/demo.sh', 'tools/constraints.txt')

pytestmark = pytest.mark.skipif(shutil.which('bash') is None or sys.platform == 'win32',
                                reason='tools/*.sh are bash scripts')

# The venv's python: logs its arguments, and prints to stdout as pip and its build backends do.
# FAKE_FAIL_ON=<word> makes any pip call whose arguments contain <word> fail.
FAKE_VENV_PYTHON = r'''#!/usr/bin/env bash
printf '%s\n' "$0 $*" >> "$FAKE_LOG"
if [[ "$1" == -c ]]; then
    echo "torch2.13.0-py311"
    exit 0
fi
echo "Collecting $*"
if [[ -n "${FAKE_FAIL_ON:-}" && "$*" == *"$FAKE_FAIL_ON"* ]]; then
    echo "ERROR: stand-in failure of: $*" >&2
    exit 1
fi
if [[ "$1 $2 $3" == "-m pip wheel" ]]; then
    while [[ $# -gt 0 && "$1" != -w ]]; do shift; done
    touch "$2/mmcv-2.1.0-cp311-cp311-linux_x86_64.whl"
    echo "  Stored in directory: $2"
    echo "Successfully built mmcv"
fi
echo "Successfully installed stand-in"
'''

# The system python3: only ever asked to create the venv.
FAKE_PYTHON3 = r'''#!/usr/bin/env bash
printf '%s\n' "python3 $*" >> "$FAKE_LOG"
[[ "$1 $2" == "-m venv" ]] || { echo "stand-in python3 got unexpected arguments: $*" >&2; exit 2; }
mkdir -p "$3/bin"
cp "$FAKE_VENV_PYTHON" "$3/bin/python"
echo "created virtual environment $3"
'''


def _write_executable(path: Path, text: str):
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


@pytest.fixture
def machine(tmp_path):
    """A fresh machine: a clone without .venv, an empty cache and the stand-in pythons on PATH."""
    clone = tmp_path / 'clone'
    for name in CLONE_FILES:
        (clone / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, clone / name)
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    _write_executable(bin_dir / 'python3', FAKE_PYTHON3)
    _write_executable(tmp_path / 'venv-python', FAKE_VENV_PYTHON)
    env = {
        **os.environ,
        'PATH': f'{bin_dir}{os.pathsep}{os.environ["PATH"]}',
        'ATTNZOO_VENV': str(tmp_path / 'venv'),
        'ATTNZOO_CACHE': str(tmp_path / 'cache'),
        'FAKE_LOG': str(tmp_path / 'calls.log'),
        'FAKE_VENV_PYTHON': str(tmp_path / 'venv-python'),
    }
    env.pop('FAKE_FAIL_ON', None)

    class Machine:
        root, venv, log = clone, tmp_path / 'venv', tmp_path / 'calls.log'
        python = tmp_path / 'venv' / 'bin' / 'python'

        def run(self, script, *args, **extra_env):
            return subprocess.run(['bash', str(clone / 'tools' / script), *args], cwd=tmp_path,
                                  env={**env, **extra_env}, capture_output=True, text=True, timeout=120)

        def calls(self):
            return self.log.read_text().splitlines() if self.log.exists() else []

    return Machine()


def _assert_prints_only_the_python(result, machine):
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines == [str(machine.python)], f'env.sh stdout must be the python path alone, got {result.stdout!r}'
    assert os.access(lines[0], os.X_OK)


@pytest.mark.parametrize('args', [(), ('--mm',)])
def test_fresh_install_prints_only_the_python_path(machine, args):
    result = machine.run('env.sh', *args)
    _assert_prints_only_the_python(result, machine)
    # the stand-ins' chatter reached the user on stderr, with the time each step took
    assert 'Successfully installed stand-in' in result.stderr
    assert 'installing torch and torchvision: done in' in result.stderr
    if args:
        assert 'Successfully built mmcv' in result.stderr
        assert 'building the mmcv 2.1.0 wheel: done in' in result.stderr
        assert any(' -m pip wheel ' in call for call in machine.calls())


def test_second_run_returns_the_path_without_installing(machine):
    machine.run('env.sh', '--mm')
    calls_after_first_run = machine.calls()
    for args in (('--mm',), ()):  # an --mm environment also serves the core one
        _assert_prints_only_the_python(machine.run('env.sh', *args), machine)
    assert machine.calls() == calls_after_first_run


def test_cached_mmcv_wheel_is_reused_in_a_new_environment(machine):
    machine.run('env.sh', '--mm')
    shutil.rmtree(machine.venv)
    result = machine.run('env.sh', '--mm')
    _assert_prints_only_the_python(result, machine)
    assert 'reusing the cached mmcv wheel' in result.stderr
    assert sum(' -m pip wheel ' in call for call in machine.calls()) == 1


def test_test_sh_runs_pytest_with_the_environment_python(machine):
    """The first-run failure: test.sh took all of env.sh's stdout as the path and exited 127."""
    result = machine.run('test.sh', '-k', 'cswin')
    assert result.returncode == 0, result.stderr
    assert machine.calls()[-1] == f'{machine.python} -m pytest -n auto --dist worksteal -k cswin'


def test_demo_sh_trains_and_evaluates_with_the_environment_python(machine):
    result = machine.run('demo.sh', '--epochs', '1')
    assert result.returncode == 0, result.stderr
    train, evaluate = machine.calls()[-2:]
    assert train.startswith(f'{machine.python} tools/train.py --model cswin_tiny_224') and train.endswith('--epochs 1')
    assert evaluate.startswith(f'{machine.python} tools/eval.py --model cswin_tiny_224')


@pytest.mark.parametrize('failing, step', [
    ('natten', 'installing natten'),
    ('pip wheel', 'building the mmcv 2.1.0 wheel'),
])
def test_failed_step_is_named_with_how_to_retry(machine, failing, step):
    result = machine.run('test.sh', FAKE_FAIL_ON=failing)
    assert result.returncode != 0
    assert result.stdout == ''
    assert 'FAILED after' in result.stderr and f'{step} (exit status 1)' in result.stderr
    assert f'retry with: bash {machine.root}/tools/env.sh --mm' in result.stderr
    assert not any('-m pytest' in call for call in machine.calls()), 'test.sh went on after env.sh failed'
    assert not (machine.venv / '.attnzoo-stamp').exists(), 'a failed install must not be stamped as complete'


def test_unknown_argument_is_refused(machine):
    result = machine.run('env.sh', '--nm')
    assert result.returncode == 2 and result.stdout == ''
    assert 'usage: bash tools/env.sh [--mm]' in result.stderr
