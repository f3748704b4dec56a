//! Paged lists of nodes and audit entries (`GET /v1/nodes`, `GET /v1/audit`), in the
//! shape of the task list (README "API"): the body keeps its array and adds `"next"`,
//! a cursor or null, also sent as `Link: <…>; rel="next"`.

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;

use super::{liveness, node_json, ApiError};
use crate::manager::state::query;
use crate::manager::Manager;

/// Page sizes of `GET /v1/nodes`.
pub const NODE_PAGE_DEFAULT: usize = 500;
/// Largest `limit` of `GET /v1/nodes`.
pub const NODE_PAGE_MAX: usize = 2_000;
/// Page sizes of `GET /v1/audit` (newest first).
pub const AUDIT_PAGE_DEFAULT: usize = 100;
/// Largest `limit` of `GET /v1/audit`.
pub const AUDIT_PAGE_MAX: usize = 10_000;

/// `?limit=&after=`, each as text so a bad value is named.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PageQuery {
    limit: Option<String>,
    after: Option<String>,
}

fn bad(field: &str, msg: String) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "invalid", msg).field(field)
}

/// The query, or a 400 naming the known parameters.
pub(crate) fn page_query(q: Result<Query<PageQuery>, QueryRejection>) -> Result<PageQuery, ApiError> {
    q.map(|Query(q)| q).map_err(|e| {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid", format!("{}; known parameters: limit, after", e.body_text()))
    })
}

impl PageQuery {
    /// The page size: `default` when absent, 1..=`max` when given.
    pub(crate) fn limit(&self, default: usize, max: usize) -> Result<usize, ApiError> {
        match self.limit.as_deref() {
            None => Ok(default),
            Some(l) => match l.parse::<usize>() {
                Ok(n) if (1..=max).contains(&n) => Ok(n),
                _ => Err(bad("limit", format!("limit must be a whole number from 1 to {max}, got {l:?}"))),
            },
        }
    }

    /// The cursor as text (empty means none), at most 253 bytes.
    pub(crate) fn after_text(&self) -> Result<Option<String>, ApiError> {
        match self.after.as_deref() {
            None | Some("") => Ok(None),
            Some(a) if a.len() > 253 => Err(bad("after", "after must be at most 253 characters".into())),
            Some(a) => Ok(Some(a.to_string())),
        }
    }

    /// The cursor as a number.
    pub(crate) fn after_number(&self) -> Result<Option<u64>, ApiError> {
        match self.after.as_deref() {
            None | Some("") => Ok(None),
            Some(a) => a
                .parse::<u64>()
                .map(Some)
                .map_err(|_| bad("after", format!("after must be the `next` cursor of a previous page, got {a:?}"))),
        }
    }
}

/// Percent-encodes a query value (unreserved characters stay).
pub fn encode(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A JSON body with `"next"` and, when there is a next page, its `Link` header.
pub(crate) fn paged(body: serde_json::Value, next_link: Option<String>) -> Response {
    let mut resp = Json(body).into_response();
    if let Some(link) = next_link {
        if let Ok(v) = HeaderValue::from_str(&format!("<{link}>; rel=\"next\"")) {
            resp.headers_mut().insert(header::LINK, v);
        }
    }
    resp
}

/// `GET /v1/nodes?limit=&after=`: nodes by name; `after` is the last name of the
/// previous page. A follower reads the leader's liveness (`api::liveness`).
pub(crate) async fn list_nodes(
    State(m): State<Arc<Manager>>,
    q: Result<Query<PageQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let q = page_query(q)?;
    let limit = q.limit(NODE_PAGE_DEFAULT, NODE_PAGE_MAX)?;
    let after = q.after_text()?;
    let key = after.clone();
    let (rows, next) = m.db.read(move |c| query::nodes_page(c, key.as_deref(), limit)).await?;
    let live = liveness(&m).await;
    let nodes: Vec<serde_json::Value> = rows.iter().map(|n| node_json(n, live.get(&n.name))).collect();
    let link = next.as_ref().map(|n| format!("/v1/nodes?limit={limit}&after={}", encode(n)));
    Ok(paged(serde_json::json!({ "nodes": nodes, "next": next }), link))
}

/// `GET /v1/audit?limit=&after=`: newest first; `after` is the `next` of the
/// previous page.
pub(crate) async fn audit_log(
    State(m): State<Arc<Manager>>,
    q: Result<Query<PageQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let q = page_query(q)?;
    let limit = q.limit(AUDIT_PAGE_DEFAULT, AUDIT_PAGE_MAX)?;
    let after = q.after_number()?;
    let (entries, next) = m.db.read(move |c| query::audit(c, after, limit)).await?;
    let link = next.map(|n| format!("/v1/audit?limit={limit}&after={n}"));
    Ok(paged(serde_json::json!({ "entries": entries, "next": next.map(|n| n.to_string()) }), link))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(limit: Option<&str>, after: Option<&str>) -> PageQuery {
        PageQuery { limit: limit.map(String::from), after: after.map(String::from) }
    }

    #[test]
    fn a_bad_page_parameter_names_itself() {
        assert_eq!(q(None, None).limit(5, 10).unwrap(), 5);
        assert_eq!(q(Some("10"), None).limit(5, 10).unwrap(), 10);
        for l in ["0", "11", "-1", "x"] {
            assert_eq!(q(Some(l), None).limit(5, 10).unwrap_err().field.as_deref(), Some("limit"), "{l}");
        }
        assert_eq!(q(None, Some("abc")).after_number().unwrap_err().field.as_deref(), Some("after"));
        assert_eq!(q(None, Some("42")).after_number().unwrap(), Some(42));
        assert_eq!(q(None, Some("")).after_text().unwrap(), None);
        assert_eq!(q(None, Some(&"x".repeat(254))).after_text().unwrap_err().field.as_deref(), Some("after"));
    }

    #[test]
    fn cursors_are_percent_encoded_in_links() {
        assert_eq!(encode("edge-1.a_b~"), "edge-1.a_b~");
        assert_eq!(encode("a b&c=d"), "a%20b%26c%3Dd");
    }
}
