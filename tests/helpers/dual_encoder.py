"""The pretrained MiniLM + EfficientNet-Lite0 dual encoder's packages: tests that need them skip where they are absent."""

from __future__ import annotations

import importlib.util

import pytest

from mmscale.models import pretrained as P

installed = all(importlib.util.find_spec(m) for m in (P.MINILM_MODULE, P.EFFNET_WEIGHTS_MODULE, P.EFFNET_CODE_MODULE))
needs_dual_encoder = pytest.mark.skipif(not installed, reason=f"needs {P.MINILM_PACKAGE} and {P.EFFNET_WEIGHTS_PACKAGE} (make setup installs them)")
