"""Model registry on a folder: see registry.py for the layout and the atomicity rules."""
from shared.registry.registry import (
    MANIFEST,
    MODEL_FILE,
    Manifest,
    ModelRegistry,
    RegistryError,
    Signature,
    TensorSpec,
    sha256_file,
    validate_name,
    validate_version,
)

__all__ = [
    "MANIFEST",
    "MODEL_FILE",
    "Manifest",
    "ModelRegistry",
    "RegistryError",
    "Signature",
    "TensorSpec",
    "sha256_file",
    "validate_name",
    "validate_version",
]
