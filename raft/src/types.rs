//! openraft type configuration and the opaque command payload.

use std::io::Cursor;

use base64::Engine as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::Member;

openraft::declare_raft_types!(
    /// openraft type configuration of holdfast: u64 ids, [`Member`] nodes, opaque byte
    /// commands and responses, whole-database snapshots held in memory.
    pub TypeConfig:
        D = Payload,
        R = Payload,
        NodeId = u64,
        Node = Member,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// Opaque bytes of one command or one response.
///
/// Serialized as a base64 string: the log and every RPC are JSON, and a JSON array of
/// numbers would make each byte cost up to four.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Payload(pub Vec<u8>);

impl Serialize for Payload {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(&self.0))
    }
}

impl<'de> Deserialize<'de> for Payload {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD.decode(s.as_bytes()).map(Payload).map_err(serde::de::Error::custom)
    }
}

/// Serde helper for `Vec<u8>` fields sent as base64 (snapshot chunks).
pub(crate) mod b64 {
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(v))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD.decode(s.as_bytes()).map_err(serde::de::Error::custom)
    }
}

/// A log id of this type configuration.
pub type LogId = openraft::LogId<u64>;
/// A stored membership of this type configuration.
pub type StoredMembership = openraft::StoredMembership<u64, Member>;
/// A storage error of this type configuration.
pub type StorageError = openraft::StorageError<u64>;
/// The openraft handle of this type configuration.
pub type Raft = openraft::Raft<TypeConfig>;
/// A log entry of this type configuration.
pub type Entry = openraft::Entry<TypeConfig>;
