"""Reference math of pmr (../shared/METHODS_NEXT.md), re-exported by mmkernels.reference."""
from __future__ import annotations

__all__: list = []
