//! The data plane: sync with managers, local ledger, reconcile, container runtime.

pub mod runtime;
