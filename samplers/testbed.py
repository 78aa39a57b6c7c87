"""Moved to ``comfyui_fast_samplers.testbeds.mixtures`` (the library never imports its test beds); this name
stays as an alias for scripts written against it."""
import sys
import warnings

from ..testbeds import mixtures as _moved

warnings.warn("comfyui_fast_samplers.samplers.testbed is now comfyui_fast_samplers.testbeds.mixtures",
              DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
