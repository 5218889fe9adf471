"""Trainability is a variable type, not a name.

``split(model)`` partitions a model by these types: every :class:`Trainable` variable goes to the optimizer, every
other variable (base weights as ``nnx.Param``, quantized weights as :class:`Quantized`) is frozen and never
differentiated. Adapter methods add :class:`Adapter` subtypes; full or selective fine-tuning re-types chosen base
weights as :class:`Tuned`.

None of these subclass ``nnx.Param``, so a ``Param`` filter never matches an adapter by accident.
"""
from flax import nnx


def is_variable(x) -> bool:
    """``is_leaf`` for a state tree whose leaves should be its variables (their types say trainable or frozen)."""
    return isinstance(x, nnx.Variable)


class Trainable(nnx.Variable):
    """Anything the optimizer updates."""


class Adapter(Trainable):
    """Parameters added by a PEFT method."""


class LoRA(Adapter):
    """Low-rank factors A (d_in x r) and B (r x d_out) of LoRA and its variants."""


class Prompt(Adapter):
    """Virtual-token embeddings of prompt tuning."""


class Prefix(Adapter):
    """Per-layer key/value prefixes of prefix tuning."""


class IA3(Adapter):
    """Learned rescaling vectors of IA3."""


class Head(Trainable):
    """A task head every method trains (the classifier on an encoder, HF PEFT's ``modules_to_save``)."""


class Tuned(Trainable):
    """A base weight that full or selective fine-tuning trains in place."""


class Quantized(nnx.Variable):
    """A frozen base weight stored as a :class:`peftjax.quant.QArray` (packed codes and scales)."""


def trainable_groups() -> tuple[str, ...]:
    """Every optimizer group name: the lower-cased names of :class:`Trainable` and all its subclasses (``lora``,
    ``prompt``, ``tuned``, and those of methods registered later, once their module is imported)."""
    found, todo = [], [Trainable]
    while todo:
        cls = todo.pop()
        found.append(cls.__name__.lower())
        todo += cls.__subclasses__()
    return tuple(sorted(set(found)))
