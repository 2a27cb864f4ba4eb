"""The module form: a copy of the model's own class whose layers carry the vectors
(:class:`ModuleForm`; how layers and calls are adapted: :mod:`.layers`)."""

from .form import ModuleForm

__all__ = ["ModuleForm"]
