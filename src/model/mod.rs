//! Domain types shared by managers and workers: task specs, states and transitions,
//! placements, nodes, and the wire types of the worker sync protocol.

pub mod spec;
pub mod state;
pub mod sync;

pub use spec::{Kind, OfflineMode, TaskSpec};
pub use state::{transition, Desired, Observed};
