"""Settings of `tandem quantize` (training/quantize.py). Torch-free: the command's flags come from
these fields (engine.options)."""

from __future__ import annotations

from dataclasses import dataclass

from engine.options import REQUIRED, check_options, option

METHODS = ("gptq", "awq", "rtn")
GPTAQ_ALPHA = 0.25  # the GPTAQ paper's share; SmolLM2-135M measured better with it than with 1 (docs/benchmarks.md)
_GPTQ_ONLY = ("act_order", "static_groups", "mse_grid", "gptaq")


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
    act_order: bool | None = option(None, "GPTQ: quantize columns by decreasing activation energy (default: on)")
    static_groups: bool | None = option(None, "GPTQ: every group's grid fixed up front from the unquantized weights, "
                                        "so act-order groups stay consecutive columns (no g_idx; compressed-tensors "
                                        "0.20 reads no other act-order) (default: on)")
    mse_grid: bool | None = option(None, "GPTQ: each group's range shrunk to the factor in [0.8, 1] of least "
                                   "rounding error, instead of its min/max (default: on)")
    gptaq: float | None = option(None, "GPTQ: asymmetric calibration (GPTAQ): aim each projection at the "
                                 "unquantized model's output, not at its own unquantized weight on the quantized "
                                 "model's inputs; the share ALPHA of that correction taken, 0: off "
                                 f"(default: {GPTAQ_ALPHA})", min=0, max=1, metavar="ALPHA")
    num_samples: int = option(128, "calibration windows (GPTQ's reference takes 128)", min=1)
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
        for name in _GPTQ_ONLY:
            if getattr(self, name) is not None and self.method != "gptq":
                raise ValueError(f"{name} is a GPTQ option")

    @property
    def group(self) -> int:
        """Inputs per scale; -1 for one per row."""
        if self.group_size is not None:
            return self.group_size
        return 128 if self.bits == 4 else -1

    @property
    def gptq_act_order(self) -> bool:
        """GPTQ visits columns by decreasing H[j, j] (False for the other methods)."""
        return self.method == "gptq" and self.act_order is not False

    @property
    def gptq_static_groups(self) -> bool:
        return self.method == "gptq" and self.static_groups is not False

    @property
    def gptq_mse_grid(self) -> bool:
        return self.method == "gptq" and self.mse_grid is not False

    @property
    def gptaq_alpha(self) -> float:
        """Share of the asymmetric-calibration correction; 0: plain GPTQ (or another method)."""
        if self.method != "gptq":
            return 0.0
        return GPTAQ_ALPHA if self.gptaq is None else self.gptaq

    @property
    def sym(self) -> bool:
        return self.symmetric if self.symmetric is not None else self.bits == 8
