//! Domain types shared by managers and workers: task specs, states and transitions,
//! placement status and stories, nodes, and the wire types of the worker sync protocol.

pub mod logs;
pub mod spec;
pub mod state;
pub mod status;
pub mod sync;

pub use logs::{log_lines_after, log_time_key, log_time_secs};
pub use spec::{Kind, OfflineMode, TaskSpec};
pub use state::{transition, Desired, Observed};
pub use status::{PlacementStatus, Story};

/// Milliseconds since the Unix epoch (wall clock, for records shown to people and for
/// leases): the one clock managers and workers share.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}
