"""Model registry on a folder: see registry.py for the layout and the atomicity rules,
manifest.py for what a version is, canary.py for the CANARY pointer."""
from shared.registry.canary import CANARY_MODES, CanaryState, canary_bucket
from shared.registry.manifest import (
    MANIFEST,
    Manifest,
    RegistryError,
    Signature,
    TensorSpec,
    sha256_file,
    validate_name,
    validate_version,
)
from shared.registry.registry import (
    GC_KEEP_LAST,
    GC_MIN_AGE_S,
    GC_ROLLBACK_DEPTH,
    LEASE_TTL_S,
    MODEL_FILE,
    GcReport,
    Lease,
    ModelRegistry,
    default_instance,
)

__all__ = [
    "CANARY_MODES",
    "GC_KEEP_LAST",
    "GC_MIN_AGE_S",
    "GC_ROLLBACK_DEPTH",
    "LEASE_TTL_S",
    "MANIFEST",
    "MODEL_FILE",
    "CanaryState",
    "GcReport",
    "Lease",
    "Manifest",
    "ModelRegistry",
    "RegistryError",
    "Signature",
    "TensorSpec",
    "canary_bucket",
    "default_instance",
    "sha256_file",
    "validate_name",
    "validate_version",
]
