#!/usr/bin/env bash
# The test suite. Creates or reuses .venv with everything the tests need (the OpenMMLab stack
# included: on a fresh machine mmcv is built once into a wheel cache, ~30 minutes), then runs pytest.
# Extra arguments go to pytest, e.g. `bash tools/test.sh -k cswin`. Tests run in one pytest-xdist worker
# per CPU core (most of the suite is single-threaded Python: the Triton interpreter, tracing, exporting);
# `-n 0` runs them in this process, `-n N` in N workers.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py=$(bash "$root/tools/env.sh" --mm)
cd "$root"
exec "$py" -m pytest -n auto --dist worksteal "$@"
