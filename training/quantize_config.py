"""Settings of `tandem quantize` (training/quantize.py). Torch-free: the command's flags come from
these fields (engine.options)."""

from __future__ import annotations

from dataclasses import dataclass

from engine.options import REQUIRED, check_options, option

METHODS = ("gptq", "awq", "rtn")


@dataclass(frozen=True)
class QuantizeConfig:
    """Validated on construction (ValueError naming the option)."""

    model: str = option(REQUIRED, "checkpoint directory to quantize (Hugging Face layout, dense)")
    out: str = option(REQUIRED, "output directory: a compressed-tensors checkpoint (resumable while it runs)")
    method: str = option("gptq", "gptq | awq: calibrated; rtn: round to nearest (no calibration data)",
                         choices=METHODS)
    calib: tuple[str, ...] = option((), "calibration text: files or directories of .py/.txt files, "
                                    "comma-separated (gptq and awq need it)", metavar="PATHS")
    bits: int = option(4, "weight bits", choices=(4, 8))
    group_size: int | None = option(None, "inputs per scale; -1: one per output row (default: 128 for 4 bits, "
                                    "-1 for 8)", min=-1)
    symmetric: bool | None = option(None, "no zero points (default: asymmetric for 4 bits, symmetric for 8)")
    act_order: bool = option(False, "GPTQ: quantize columns by decreasing activation energy (writes g_idx)")
    num_samples: int = option(64, "calibration windows", min=1)
    seq_len: int = option(256, "tokens per calibration window", min=8)
    damp: float = option(0.01, "GPTQ: dampening added to the Hessian's diagonal, as a fraction of its mean",
                         above=0, max=1)
    batch_size: int = option(8, "calibration windows per forward", min=1)
    seed: int = option(0, "seed of the calibration windows' positions", min=0)

    def __post_init__(self) -> None:
        check_options(self)
        if self.group_size == 0:
            raise ValueError("group_size must be positive, or -1 for one group per row")
        if self.method != "rtn" and not self.calib:
            raise ValueError(f"{self.method} needs calibration text (calib=PATHS)")
        if self.act_order and self.method != "gptq":
            raise ValueError("act_order is a GPTQ option")

    @property
    def group(self) -> int:
        """Inputs per scale; -1 for one per row."""
        if self.group_size is not None:
            return self.group_size
        return 128 if self.bits == 4 else -1

    @property
    def sym(self) -> bool:
        return self.symmetric if self.symmetric is not None else self.bits == 8
