//! The data plane: sync with managers, local ledger, reconcile, container runtime.

pub mod agent;
pub mod fence;
pub mod health;
pub mod images;
pub mod ledger;
pub mod reconcile;
pub mod resources;
pub mod runtime;
