"""`LossSpec`: the validated `config.loss` fields the contrastive losses read."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from jaxmedclip import config_schema
from jaxmedclip.config_schema import LOSS_IMPLS as IMPLEMENTATIONS
from jaxmedclip.config_schema import LOSSES, MATMUL_INPUTS, MULTI_POSITIVE_KEYS, TARGETS

_DEFAULT = config_schema.defaults("loss")  # The defaults are declared there.


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """The validated contents of the `loss` config (see the package docstring)."""

    name: str = _DEFAULT["name"]
    impl: str = _DEFAULT["impl"]
    targets: str = _DEFAULT["targets"]
    multi_positive_key: tuple[str, ...] = _DEFAULT["multi_positive_key"]
    soft_target_temperature: float = _DEFAULT["soft_target_temperature"]
    label_smoothing: float = _DEFAULT["label_smoothing"]
    i2t_weight: float = _DEFAULT["i2t_weight"]
    t2i_weight: float = _DEFAULT["t2i_weight"]
    tile_size: int = _DEFAULT["tile_size"]
    matmul_inputs: str = _DEFAULT["matmul_inputs"]

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict | Mapping[str, Any]) -> LossSpec:
        """Reads and checks `config.loss` (its declared fields: `config_schema.LOSS`)."""
        values = config_schema.complete_section("loss", config)
        keys = values["multi_positive_key"]
        if isinstance(keys, str):
            keys = tuple(k.strip() for k in keys.split(",") if k.strip())
        spec = cls(**{**{f.name: values[f.name] for f in dataclasses.fields(cls)},
                      "multi_positive_key": tuple(keys), "tile_size": values["tile_size"] or 0})
        spec.validate()
        return spec

    def validate(self) -> None:
        def choose(field: str, value: Any, options: Sequence[str]) -> None:
            if value not in options:
                raise ValueError(f"loss.{field}={value!r} is unknown; choose one of {options}")

        choose("name", self.name, LOSSES)
        choose("impl", self.impl, IMPLEMENTATIONS)
        choose("targets", self.targets, TARGETS)
        choose("matmul_inputs", self.matmul_inputs, MATMUL_INPUTS)
        if not self.multi_positive_key:
            raise ValueError(
                f"loss.multi_positive_key is empty; use one or both of {MULTI_POSITIVE_KEYS}"
            )
        for key in self.multi_positive_key:
            choose("multi_positive_key", key, MULTI_POSITIVE_KEYS)
        if not self.soft_target_temperature > 0:
            raise ValueError(
                f"loss.soft_target_temperature={self.soft_target_temperature} must be > 0"
            )
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"loss.label_smoothing={self.label_smoothing} must be in [0, 1)")
        if isinstance(self.tile_size, bool) or not isinstance(self.tile_size, int) or (
                self.tile_size < 0):
            raise ValueError(f"loss.tile_size={self.tile_size!r} must be an integer >= 0 "
                             "(0: untiled)")
        if self.tile_size and self.impl != "ring":
            why = ("the untiled reference" if self.impl == "dense"
                   else "it gathers every device's embeddings, [global batch, dim] each")
            raise ValueError(
                f"loss.tile_size={self.tile_size} tiles the ring loss, and loss.impl="
                f"{self.impl!r} is never tiled ({why}): set loss.impl='ring' (the same "
                "numbers, on one device or many) or loss.tile_size=0"
            )

    @property
    def softmax(self) -> bool:
        return self.name == "softmax"

    def tile_for(self, local_batch: int) -> int:
        """The tile edge used for a per-device batch: `tile_size`, at most the batch;
        the whole batch when untiled."""
        if not self.tile_size:
            return local_batch
        return min(self.tile_size, local_batch)
