"""Model kinds: built-ins by name, user factories by `package.module:function`."""

from kiln.models.factory import BUILTIN_KINDS, build_model, resolve_factory

__all__ = ["BUILTIN_KINDS", "build_model", "resolve_factory"]
