"""megatron-core's compiled dataset helpers (``megatron.core.datasets.helpers_cpp``).

GPTDataset and BlendedDataset build their sample and blending indices with this pybind11
extension. The megatron-core 0.16.1 wheel ships it prebuilt for its Python, so normally
there is nothing to do. Where it is missing (a source install, another Python), megatron's
own ``compile_helpers()`` cannot help: it runs ``make`` in the package directory and the
wheel has no Makefile (and it calls sys.exit on failure). So we compile the ``helpers.cpp``
the wheel does ship with torch's extension builder -- torch bundles the pybind11 headers
and serialises concurrent builds with a lock file -- and register the result under
megatron's module name.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import sysconfig
from pathlib import Path

from mesh_megatron.data.cache import default_cache_dir

logger = logging.getLogger(__name__)

MODULE = "megatron.core.datasets.helpers_cpp"


def _prebuilt_available() -> bool:
    try:
        importlib.import_module(MODULE)
    except ImportError:
        return False
    return True


def _compile(build_dir: Path) -> object:
    import megatron.core.datasets as datasets_pkg
    from torch.utils import cpp_extension

    source = Path(datasets_pkg.__file__).with_name("helpers.cpp")
    if not source.is_file():
        raise RuntimeError(
            f"{MODULE} is not built and {source} is missing, so it cannot be compiled; "
            "reinstall megatron-core from a wheel for this Python"
        )
    build_dir.mkdir(parents=True, exist_ok=True)
    logger.warning("compiling megatron-core dataset helpers into %s (once)", build_dir)
    # The name must match PYBIND11_MODULE(helpers_cpp, ...) in helpers.cpp.
    return cpp_extension.load(
        name="helpers_cpp",
        sources=[str(source)],
        build_directory=str(build_dir),
        extra_cflags=["-O3"],
        verbose=False,
    )


def ensure_helpers_cpp(build_dir: str | os.PathLike | None = None) -> str:
    """Make ``import megatron.core.datasets.helpers_cpp`` work; say how ('prebuilt' or
    the path of the compiled module). Needs a C++ compiler only in the fallback."""
    if MODULE in sys.modules or _prebuilt_available():
        return "prebuilt"
    import megatron.core
    import megatron.core.datasets as datasets_pkg

    tag = f"megatron-core-{megatron.core.__version__}-{sysconfig.get_config_var('SOABI')}"
    target = Path(build_dir) if build_dir else default_cache_dir() / "helpers_cpp" / tag
    module = _compile(target)
    sys.modules[MODULE] = module
    datasets_pkg.helpers_cpp = module
    return str(getattr(module, "__file__", target))
