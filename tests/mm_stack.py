"""The OpenMMLab stack in the tests: whether it is installed (one check for every test file), and a cache
for mmengine's config-index lookup.

Installed but broken (e.g. mmcv without its compiled ops) is an error, not a skip: the test files import
``mmcv.ops`` themselves.
"""
import functools
import importlib.util

import pytest

MM_PACKAGES = ('mmengine', 'mmcv', 'mmdet', 'mmseg')
MM_MISSING = [name for name in MM_PACKAGES if importlib.util.find_spec(name) is None]
SKIP_REASON = f'OpenMMLab stack not installed ({", ".join(MM_MISSING)} missing): pip install "attnzoo[mm]"'

# for tests (or parametrized cases) that need the stack in a file that does not
needs_mm = pytest.mark.skipif(bool(MM_MISSING), reason=SKIP_REASON)


def skip_module_without_mm():
    """Call at the top of a test file that needs the stack throughout."""
    if MM_MISSING:
        pytest.skip(SKIP_REASON, allow_module_level=True)


def _cache_config_index():
    """A config inheriting ``mmdet::<model>/<config>.py`` makes mmengine read the package's model index and
    its ~300 metafile.yml files to find that config, every time (0.8 s of a config's 0.9 s parse here).
    They do not change within a test session: each file is read once (mmengine only reads the result)."""
    import mmengine.config.utils as config_utils
    config_utils.load = functools.lru_cache(maxsize=None)(config_utils.load)


if not MM_MISSING:
    _cache_config_index()
