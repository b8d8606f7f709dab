"""Models that describe themselves: a JSON-able spec of their constructor arguments, and back.

A class deriving from :class:`Described` remembers the arguments it was constructed with (the
most-derived constructor's, bound to its signature). :meth:`Described.to_spec` gives
``{"name", "kwargs", "classes"}``; :meth:`Described.from_spec` rebuilds the architecture, without
pretrained weights by default since a state dict follows. That is what a model file stores
(:mod:`fewsight.hub`), so any model built in Python — not only from a config — can be saved.

Geometry objects among the arguments (``anchor_generator``, ``coder``) are stored as their own
constructor arguments (the constructors take either); an injected ``nn.Module`` (a custom backbone or head) cannot be described and
:meth:`~Described.to_spec` says so.

Example:
    >>> from fewsight.models import RetinaNet
    >>> m = RetinaNet(3, backbone="mobilenet_v2", weights=None, class_names=["a", "b", "c"])
    >>> spec = m.to_spec()
    >>> spec["name"], spec["kwargs"]["backbone"], spec["classes"]
    ('retinanet', 'mobilenet_v2', ['a', 'b', 'c'])
    >>> type(RetinaNet.from_spec(spec)).__name__
    'RetinaNet'
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Mapping
from typing import Any, ClassVar

from fewsight.errors import InvalidArgumentError
from fewsight.geometry import AnchorGenerator, BoxCoder

__all__ = ["Described"]

# Constructor arguments that take a geometry object; the spec holds the object's own arguments.
_GEOMETRY = {"anchor_generator": AnchorGenerator, "coder": BoxCoder}
# Arguments the spec leaves out: the classes are stored apart, pretrained weights never (the state dict follows).
_NOT_STORED = ("self", "num_classes", "class_names")
_WEIGHTS = ("weights",)


def _geometry_args(name: str, value: Any) -> dict[str, Any]:
    if isinstance(value, AnchorGenerator):
        return {"levels": list(value.levels), "sizes": list(value.sizes), "scales": list(value.scales),
                "aspect_ratios": list(value.aspect_ratios)}
    if isinstance(value, BoxCoder):
        return {"weights": [float(w) for w in value.weights], "clamp": float(value.clamp)}
    raise InvalidArgumentError(f"{name}: expected a mapping or a {_GEOMETRY[name].__name__}, got {type(value).__name__}")


def _plain(name: str, value: Any) -> Any:
    """``value`` as JSON-able data, or InvalidArgumentError naming the argument."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidArgumentError(f"{name}: expected a finite number to describe the model, got {value}")
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(f"{name}[{i}]", v) for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        return {str(k): _plain(f"{name}.{k}", v) for k, v in value.items()}
    raise InvalidArgumentError(
        f"{name}: expected plain values (numbers, strings, lists, mappings) to describe the model, got "
        f"{type(value).__name__}; a model built with an injected object cannot be saved by its spec"
    )


class Described:
    """Mixin: remember the constructor's arguments; ``to_spec`` / ``from_spec`` (see the module)."""

    #: The model's name in specs and model files.
    spec_name: ClassVar[str]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__init__" not in cls.__dict__:
            return
        init = cls.__dict__["__init__"]
        signature = inspect.signature(init)

        @functools.wraps(init)
        def recording_init(self: Any, *args: Any, **kw: Any) -> None:
            init(self, *args, **kw)
            if type(self) is cls:  # the most-derived constructor's arguments describe the model
                bound = signature.bind(self, *args, **kw)
                arguments = dict(bound.arguments)
                extra = arguments.pop(next((p.name for p in signature.parameters.values()
                                            if p.kind is inspect.Parameter.VAR_KEYWORD), ""), {})
                self.__dict__["_spec_arguments"] = {**arguments, **extra}

        cls.__init__ = recording_init  # type: ignore[misc]

    def to_spec(self) -> dict[str, Any]:
        """``{"name", "kwargs", "classes"}``: what rebuilds this model's architecture (JSON-able)."""
        arguments = self.__dict__.get("_spec_arguments")
        if arguments is None:
            raise InvalidArgumentError(f"model: expected a constructed {type(self).__name__}, got one without arguments")
        kwargs: dict[str, Any] = {}
        for key, value in arguments.items():
            if key in _NOT_STORED:
                continue
            if key in _GEOMETRY and value is not None and not isinstance(value, Mapping):
                value = _geometry_args(key, value)
            elif key in _WEIGHTS and value is not None and not isinstance(value, str):
                value = str(value)  # an enum member or a path: kept to say where the weights came from
            kwargs[key] = _plain(key, value)
        classes = getattr(self, "classes", None)
        return {"name": self.spec_name, "kwargs": kwargs,
                "classes": None if classes is None else [str(c) for c in classes]}

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], children: Mapping[str, Any] | None = None, *,
                  pretrained: bool = False) -> Any:
        """The model ``spec`` describes, with fresh weights; ``pretrained=False`` drops the backbone weights
        argument (a state dict follows, and loading never downloads)."""
        kwargs = dict(spec.get("kwargs") or {})
        if not pretrained:
            for key in [k for k in kwargs if k in _WEIGHTS or k.endswith("_weights")]:
                kwargs[key] = None
        classes = spec.get("classes")
        if classes is not None:
            kwargs["class_names"] = [str(c) for c in classes]
            num_classes = len(classes)
        else:
            num_classes = spec.get("num_classes")
        if num_classes is None:
            raise InvalidArgumentError(f"spec: expected 'classes' or 'num_classes' for {cls.__name__}, got neither")
        return cls(num_classes, **kwargs)
