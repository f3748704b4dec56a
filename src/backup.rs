//! The cluster snapshot file: what `GET /v1/cluster/snapshot` streams and what
//! `holdfast cluster snapshot save|restore` writes and reads.
//!
//! Layout: the magic line `HOLDFAST-SNAPSHOT 1\n`, one line of JSON ([`Header`]), then
//! exactly `db_bytes` bytes of a consistent copy of the replicated state database
//! (tasks, placements, nodes, tokens, audit, and the Raft metadata it was applied
//! to). The header carries the SHA-256 of those bytes, so a truncated or altered file
//! is refused before anything is written.

use std::io::{BufRead, Read, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// First line of every snapshot file.
pub const MAGIC: &[u8] = b"HOLDFAST-SNAPSHOT 1\n";
/// Longest header line accepted (it is a few hundred bytes).
const MAX_HEADER: u64 = 64 * 1024;

/// What a snapshot file says about itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// Manager that took it.
    pub taken_by: String,
    /// Wall clock when it was taken, ms since the Unix epoch.
    pub taken_at_ms: u64,
    /// Version of the holdfast that took it.
    pub version: String,
    /// Raft log index the copy is applied up to.
    pub last_applied: u64,
    /// Names of the managers of the cluster it came from.
    pub members: Vec<String>,
    /// Length of the database copy that follows the header.
    pub db_bytes: u64,
    /// Lower-case hex SHA-256 of the database copy.
    pub db_sha256: String,
}

/// Why a snapshot file was refused.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Reading or writing failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// Not a holdfast snapshot at all.
    #[error("not a holdfast snapshot (it does not start with {:?})", String::from_utf8_lossy(MAGIC).trim_end())]
    NotSnapshot,
    /// The header line is unreadable.
    #[error("unreadable snapshot header: {0}")]
    Header(String),
    /// Fewer bytes than the header promises.
    #[error("truncated: the header promises {expected} bytes of database, the file has {got}")]
    Truncated {
        /// Promised length.
        expected: u64,
        /// Bytes found.
        got: u64,
    },
    /// More bytes than the header promises.
    #[error("trailing data after the {expected} bytes of database the header promises")]
    Trailing {
        /// Promised length.
        expected: u64,
    },
    /// The content does not match its checksum.
    #[error("checksum mismatch: header says {expected}, content is {got}; the file is damaged")]
    Checksum {
        /// Checksum in the header.
        expected: String,
        /// Checksum of the content.
        got: String,
    },
}

/// Hex SHA-256 of a file's content.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The magic line and header line that precede the database bytes.
pub fn preamble(header: &Header) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    // A struct of strings and numbers always serializes.
    out.extend(serde_json::to_vec(header).unwrap_or_default());
    out.push(b'\n');
    out
}

/// Reads and checks a whole snapshot from `input`, copying the database bytes to `out`.
/// Returns the header once the length and checksum match; on any error `out` holds
/// partial content the caller must discard.
pub fn read_verified(input: impl Read, mut out: impl Write) -> Result<Header, SnapshotError> {
    let mut r = std::io::BufReader::new(input);
    let mut magic = vec![0u8; MAGIC.len()];
    r.read_exact(&mut magic).map_err(|_| SnapshotError::NotSnapshot)?;
    if magic != MAGIC {
        return Err(SnapshotError::NotSnapshot);
    }
    let mut line = Vec::new();
    (&mut r).take(MAX_HEADER).read_until(b'\n', &mut line)?;
    if line.last() != Some(&b'\n') {
        return Err(SnapshotError::Header("the header line is missing or too long".into()));
    }
    let header: Header = serde_json::from_slice(&line).map_err(|e| SnapshotError::Header(e.to_string()))?;
    let mut h = Sha256::new();
    let mut got = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    let mut body = (&mut r).take(header.db_bytes);
    loop {
        let n = body.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        out.write_all(&buf[..n])?;
        got += n as u64;
    }
    if got < header.db_bytes {
        return Err(SnapshotError::Truncated { expected: header.db_bytes, got });
    }
    if r.read(&mut [0u8; 1])? != 0 {
        return Err(SnapshotError::Trailing { expected: header.db_bytes });
    }
    let sum = hex(&h.finalize());
    if sum != header.db_sha256 {
        return Err(SnapshotError::Checksum { expected: header.db_sha256, got: sum });
    }
    out.flush()?;
    Ok(header)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(body: &[u8]) -> Vec<u8> {
        let header = Header {
            taken_by: "m1".into(),
            taken_at_ms: 1,
            version: "0.1.0".into(),
            last_applied: 9,
            members: vec!["m1".into()],
            db_bytes: body.len() as u64,
            db_sha256: hex(&Sha256::digest(body)),
        };
        let mut out = preamble(&header);
        out.extend_from_slice(body);
        out
    }

    #[test]
    fn a_whole_file_reads_back_and_every_damage_is_named() {
        let good = file(b"SQLite format 3\0 pretend pages");
        let mut out = Vec::new();
        let h = read_verified(&good[..], &mut out).expect("good file");
        assert_eq!(out, b"SQLite format 3\0 pretend pages");
        assert_eq!(h.last_applied, 9);

        let check = |bytes: &[u8], want: &str| {
            let e = read_verified(bytes, std::io::sink()).expect_err("must be refused");
            assert!(e.to_string().contains(want), "{e} should say {want}");
        };
        check(b"PK\x03\x04 a zip file", "not a holdfast snapshot");
        check(&good[..good.len() - 3], "truncated");
        let mut longer = good.clone();
        longer.push(b'x');
        check(&longer, "trailing data");
        let mut flipped = good.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        check(&flipped, "checksum mismatch");
        let mut bad_header = MAGIC.to_vec();
        bad_header.extend_from_slice(b"{not json}\n");
        check(&bad_header, "unreadable snapshot header");
    }
}
