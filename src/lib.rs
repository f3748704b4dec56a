//! holdfast: an edge-native container orchestrator in one static binary.
//!
//! See `ARCHITECTURE.md` for the map; `main.rs` only parses flags and calls [`run`]-style
//! entry points of the modules below.

pub mod echo;
pub mod worker;
