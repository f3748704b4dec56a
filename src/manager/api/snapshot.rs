//! `GET /v1/cluster/snapshot`: an online, consistent backup of the replicated state,
//! streamed in the format of `crate::backup` (see README, "Back up, restore, upgrade").

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;

use super::ApiError;
use crate::backup::{self, Header};
use crate::manager::{now_ms, Manager};

/// Takes a consistent copy of the state database (after a linearizable read barrier,
/// so it holds every write acknowledged before the request) and streams it with its
/// header and checksum. The copy is made in the manager's scratch directory and
/// unlinked as soon as it is open, so an interrupted download leaves nothing behind.
pub(super) async fn cluster_snapshot(State(m): State<Arc<Manager>>) -> Result<Response, ApiError> {
    let dir = m.settings.scratch_dir.clone();
    let copy = dir.join(format!("snapshot-{}.db", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir)
        .map_err(|e| ApiError::internal(format!("cannot create scratch directory {}: {e}", dir.display())))?;
    let applied = match m.db.backup_to(&copy).await {
        Ok(a) => a,
        Err(e) => {
            let _ = std::fs::remove_file(&copy);
            return Err(e.into());
        }
    };
    let hashing = copy.clone();
    let digest = tokio::task::spawn_blocking(move || {
        let len = std::fs::metadata(&hashing)?.len();
        backup::sha256_file(&hashing).map(|sum| (len, sum))
    })
    .await
    .map_err(|e| ApiError::internal(format!("hashing the snapshot panicked: {e}")));
    let file = tokio::fs::File::open(&copy).await;
    // Open (or failed): the name is no longer needed either way.
    let _ = std::fs::remove_file(&copy);
    let (db_bytes, db_sha256) =
        digest?.map_err(|e| ApiError::internal(format!("cannot read the snapshot copy: {e}")))?;
    let file = file.map_err(|e| ApiError::internal(format!("cannot open the snapshot copy: {e}")))?;
    let status = m.db.status();
    let header = Header {
        taken_by: status.name.clone(),
        taken_at_ms: now_ms(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        last_applied: applied,
        members: status.members.iter().map(|mm| mm.member.name.clone()).collect(),
        db_bytes,
        db_sha256,
    };
    let preamble = backup::preamble(&header);
    let total = preamble.len() as u64 + db_bytes;
    let head = futures::stream::once(async move { Ok::<_, std::io::Error>(bytes::Bytes::from(preamble)) });
    let body = Body::from_stream(head.chain(tokio_util::io::ReaderStream::new(file)));
    let name = format!("attachment; filename=\"holdfast-{}-{applied}.snapshot\"", header.taken_by);
    Ok((
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, total.to_string()),
            (header::CONTENT_DISPOSITION, name),
        ],
        body,
    )
        .into_response())
}
