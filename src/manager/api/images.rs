//! `/v1/images`: push a `docker save` archive (streamed, never held whole in memory),
//! list the catalogue, remove an image (README "Images without a registry").
//!
//! The push route is served outside the API's request timeout and body limit (an
//! image is large and slow on a thin link); it has its own bounds instead: at most
//! [`MAX_UPLOADS`] at once, and at most [`IDLE`] between two chunks of a body.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt;

use super::{write_audited, ApiError, Who};
use crate::manager::images::{ingest, IngestError, UploadCut};
use crate::manager::state::images::{self as catalogue, ImageCommand};
use crate::manager::state::Command;
use crate::manager::{now_ms, Manager};
use crate::model::sync::normalize_image_ref;

/// Pushes being received at once; more get a 503 at once.
pub const MAX_UPLOADS: usize = 2;
/// Longest silence inside a push body before it is abandoned.
pub const IDLE: Duration = Duration::from_secs(60);

/// The push (and list) route, merged outside the API limits (see the module doc).
pub fn upload_router(manager: Arc<Manager>) -> Router {
    Router::new()
        // GET shares the path, so it is served here too (a cheap catalogue read).
        .route("/v1/images", post(push).get(list))
        .layer(DefaultBodyLimit::disable())
        .with_state(manager)
}

/// One image and its removal, inside the API limits.
pub fn router() -> Router<Arc<Manager>> {
    Router::new().route("/v1/images/{*reference}", get(get_one).delete(remove))
}

fn ingest_error(e: IngestError) -> ApiError {
    let (status, code) = e.status();
    ApiError::new(status, code, e.to_string())
}

async fn push(State(m): State<Arc<Manager>>, who: Who, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    static SLOTS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(MAX_UPLOADS);
    let _slot = SLOTS.try_acquire().map_err(|_| {
        ApiError::unavailable(format!("{MAX_UPLOADS} image pushes are already in progress; retry shortly"), None)
    })?;
    let free = m.blobs.free_above_reserve();
    if let Some(len) =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok())
    {
        if len > free {
            return Err(ingest_error(IngestError::NoSpace { need: len, free }));
        }
    }
    // Each chunk must arrive within IDLE; a stalled client costs a slot for that long.
    let chunks = futures::stream::unfold(body.into_data_stream(), |mut s| async move {
        match tokio::time::timeout(IDLE, s.next()).await {
            Ok(Some(Ok(b))) => Some((Ok(b), s)),
            Ok(Some(Err(e))) => Some((Err(std::io::Error::other(UploadCut::Interrupted(e.to_string()))), s)),
            Ok(None) => None,
            Err(_) => Some((Err(std::io::Error::other(UploadCut::Stalled(IDLE))), s)),
        }
    });
    let reader = tokio_util::io::SyncIoBridge::new(tokio_util::io::StreamReader::new(Box::pin(chunks)));
    let store = m.blobs.clone();
    let entries = tokio::task::spawn_blocking(move || ingest(&store, reader))
        .await
        .map_err(|e| ApiError::internal(format!("image ingest stopped: {e}")))?
        .map_err(ingest_error)?;
    let mut images = Vec::new();
    let actor = who.actor;
    for entry in entries {
        let subject = entry.reference.clone();
        let cmd = Command::Image(ImageCommand::Put { entry: entry.clone(), now_ms: now_ms() });
        let who = Who { actor: actor.clone(), on_behalf_of: who.on_behalf_of.clone() };
        write_audited(&m, who, "POST /v1/images", &subject, Some(cmd)).await?;
        images.push(serde_json::json!({
            "reference": entry.reference,
            "id": entry.config_digest,
            "size": entry.size(),
            "layers": entry.layers,
        }));
    }
    Ok((StatusCode::CREATED, Json(serde_json::json!({ "images": images }))).into_response())
}

fn image_json(m: &Manager, r: &catalogue::ImageRow) -> serde_json::Value {
    let here = m.blobs.has(&r.entry.config_digest) && r.entry.layers.iter().all(|l| m.blobs.has(&l.digest));
    serde_json::json!({
        "reference": r.entry.reference,
        "id": r.entry.config_digest,
        "size": r.size,
        "layers": r.entry.layers,
        "pushed_ms": r.pushed_ms,
        "blobs_here": here,
    })
}

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    /// Comma-separated blob digests: the answer says which this manager holds (the CLI
    /// leaves those layers out of a push).
    have: Option<String>,
}

async fn list(
    State(m): State<Arc<Manager>>,
    q: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid", e.body_text()).field("have"))?;
    if let Some(have) = q.have {
        let asked: Vec<&str> = have.split(',').filter(|d| !d.is_empty()).take(catalogue::MAX_LAYERS).collect();
        if let Some(bad) = asked.iter().find(|d| !catalogue::valid_digest(d)) {
            return Err(ApiError::new(StatusCode::BAD_REQUEST, "invalid", format!("{bad:?} is not a sha256 digest"))
                .field("have"));
        }
        let held: Vec<&str> = asked.into_iter().filter(|d| m.blobs.has(d)).collect();
        return Ok(Json(serde_json::json!({ "have": held })));
    }
    let rows = m.db.read(catalogue::list).await?;
    let images: Vec<serde_json::Value> = rows.iter().map(|r| image_json(&m, r)).collect();
    Ok(Json(serde_json::json!({ "images": images })))
}

fn reference_of(raw: &str) -> Result<String, ApiError> {
    let r = normalize_image_ref(raw);
    if !catalogue::valid_reference(&r) {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "invalid", format!("{raw:?} is not an image reference"))
            .field("reference"));
    }
    Ok(r)
}

async fn get_one(State(m): State<Arc<Manager>>, Path(raw): Path<String>) -> Result<Json<serde_json::Value>, ApiError> {
    let reference = reference_of(&raw)?;
    let key = reference.clone();
    match m.db.read(move |c| catalogue::get(c, &key)).await? {
        Some(r) => Ok(Json(image_json(&m, &r))),
        None => {
            Err(ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no image {reference} in the catalogue")))
        }
    }
}

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RemoveQuery {
    force: Option<bool>,
}

async fn remove(
    State(m): State<Arc<Manager>>,
    who: Who,
    Path(raw): Path<String>,
    q: Result<Query<RemoveQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid", e.body_text()).field("force"))?;
    let reference = reference_of(&raw)?;
    let cmd = Command::Image(ImageCommand::Remove {
        reference: reference.clone(),
        force: q.force.unwrap_or(false),
        unused_since_ms: None,
        now_ms: now_ms(),
    });
    write_audited(&m, who, "DELETE /v1/images/{ref}", &reference, Some(cmd)).await?;
    Ok(Json(serde_json::json!({ "reference": reference, "removed": true })).into_response())
}
