"""Moved to ``comfyui_fast_samplers.testbeds.bridges`` (the library never imports its test beds); this name
stays as an alias for scripts written against it."""
import sys
import warnings

from ..testbeds import bridges as _moved

warnings.warn("comfyui_fast_samplers.samplers.bridge_testbed is now comfyui_fast_samplers.testbeds.bridges",
              DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
