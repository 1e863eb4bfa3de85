"""Test session set-up.

Without a GPU, Triton kernels run in Triton's CPU interpreter, which only takes effect when
TRITON_INTERPRET is set before triton is first imported: so this runs before anything imports
triton (torch imports it lazily).
"""
import os
import sys

import pytest
import torch

if 'TRITON_INTERPRET' not in os.environ and not torch.cuda.is_available():
    if 'triton' in sys.modules:
        raise RuntimeError('triton was imported before tests/conftest.py could set TRITON_INTERPRET=1; '
                           'set TRITON_INTERPRET=1 in the environment to run the Triton kernels on CPU')
    os.environ['TRITON_INTERPRET'] = '1'

# Under pytest-xdist (tools/test.sh runs one worker per core) each worker keeps to one thread: two
# workers with a thread per core each would oversubscribe the machine and wait on each other's spins.
if 'PYTEST_XDIST_WORKER' in os.environ:
    torch.set_num_threads(1)
    os.environ.setdefault('OMP_NUM_THREADS', '1')  # for the tools the tests run in subprocesses


@pytest.fixture(scope='module')
def one_thread():
    """For tiny shapes: a second thread only adds a wait per op (long on a busy machine), and one thread
    keeps runs bit-for-bit repeatable. Restores the thread count after the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
