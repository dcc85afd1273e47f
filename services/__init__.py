"""The three domain services. Each holds only its adapter, servicer and main; the runtime is shared/."""
