//! `GET /v1/openapi.json`: an OpenAPI 3.1 description of the public API, built with
//! utoipa. Response bodies of the list and read routes come from the types the
//! handlers serialise ([`query::TaskView`] and friends derive `ToSchema`); every error
//! is the one shape `{"error":{"code","message","field"}}`.
//!
//! [`OPERATIONS`] is the table of what the API serves; a unit test checks it against
//! the `.route(...)` calls of the routers (both directions), and `tests/lists.rs`
//! against the running process.

use std::sync::OnceLock;

use axum::http::header;
use axum::response::{IntoResponse, Response};
use utoipa::openapi::path::{HttpMethod, OperationBuilder, ParameterBuilder, ParameterIn};
use utoipa::openapi::request_body::RequestBodyBuilder;
use utoipa::openapi::response::{ResponseBuilder, ResponsesBuilder};
use utoipa::openapi::schema::{ObjectBuilder, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{
    ComponentsBuilder, ContentBuilder, InfoBuilder, OpenApi, OpenApiBuilder, Paths, Ref, RefOr, Required, Schema,
};
use utoipa::{PartialSchema, ToSchema};

use crate::manager::state::query;

/// The error body every failure carries.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct ErrorBody {
    /// The error.
    error: ErrorDetail,
}

/// One error.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct ErrorDetail {
    /// Machine-readable code (`invalid`, `not_found`, `conflict`, `unavailable`, ...).
    code: String,
    /// What went wrong, for people.
    message: String,
    /// The parameter or body field at fault, if one is.
    field: Option<String>,
}

/// A page of tasks (`GET /v1/tasks`).
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct TaskPage {
    /// The tasks, newest first.
    tasks: Vec<query::TaskView>,
    /// Cursor of the next page (`after=`), or null at the end; also a `Link` header.
    next: Option<String>,
}

/// A page of audit entries (`GET /v1/audit`).
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct AuditPage {
    /// The entries, newest first.
    entries: Vec<query::AuditEntry>,
    /// Cursor of the next page, or null at the end.
    next: Option<String>,
}

/// One public operation: method, path (axum syntax), summary, and the schema of a
/// success body when it has a named one.
pub struct Operation {
    /// HTTP method, upper case.
    pub method: &'static str,
    /// Path, with `{id}` parameters.
    pub path: &'static str,
    /// One line for people.
    pub summary: &'static str,
    /// Success status.
    pub status: u16,
    /// Named schema of the success body.
    pub body: Option<&'static str>,
    /// Query parameters.
    pub query: &'static [&'static str],
}

const fn op(method: &'static str, path: &'static str, summary: &'static str) -> Operation {
    Operation { method, path, summary, status: 200, body: None, query: &[] }
}

/// Every operation of the public API port (the web UI's files aside).
pub const OPERATIONS: &[Operation] = &[
    Operation {
        status: 201,
        ..op("POST", "/v1/tasks", "Submit a task (TaskSpec JSON body; `Idempotency-Key` makes retries safe)")
    },
    Operation {
        body: Some("TaskPage"),
        query: &["limit", "after", "state", "node", "name"],
        ..op("GET", "/v1/tasks", "One page of tasks, newest first")
    },
    Operation { body: Some("TaskView"), ..op("GET", "/v1/tasks/{id}", "One task with placements and history") },
    Operation { status: 202, ..op("DELETE", "/v1/tasks/{id}", "Stop a task") },
    Operation {
        query: &["tail", "after"],
        ..op(
            "GET",
            "/v1/tasks/{id}/logs",
            "The current placement's container logs (text; with `after`, JSON lines and a cursor)",
        )
    },
    Operation { query: &["limit", "after"], ..op("GET", "/v1/nodes", "One page of nodes, by name") },
    op("GET", "/v1/nodes/{id}", "One node with its history"),
    Operation {
        query: &["force"],
        ..op("DELETE", "/v1/nodes/{id}", "Remove a decommissioned node and revoke its certificates (admin)")
    },
    Operation { status: 202, ..op("POST", "/v1/nodes/{id}/drain", "Drain a node (or end a drain)") },
    op("POST", "/v1/nodes/{id}/eligibility", "Whether a node takes new placements"),
    op("POST", "/v1/nodes/{id}/revoke", "Revoke a node's certificates (admin)"),
    op("GET", "/v1/cluster", "Raft status and members"),
    op("DELETE", "/v1/cluster/members/{id}", "Remove a manager (admin)"),
    op("GET", "/v1/cluster/snapshot", "A consistent snapshot of the replicated state (admin; binary)"),
    op("POST", "/v1/cluster/join-tokens", "Rotate a join token (admin)"),
    op("GET", "/v1/cluster/ca", "Where a CA rotation stands"),
    Operation { status: 201, ..op("POST", "/v1/cluster/ca/rotate", "Start a CA rotation (admin)") },
    op("POST", "/v1/cluster/ca/finish", "Retire the previous CA (admin; `{\"force\":true}` to insist)"),
    Operation { status: 201, ..op("POST", "/v1/images", "Push a `docker save` archive (operator; streamed body)") },
    Operation { query: &["have"], ..op("GET", "/v1/images", "The image catalogue") },
    op("GET", "/v1/images/{*reference}", "One catalogued image"),
    Operation {
        query: &["force"],
        ..op("DELETE", "/v1/images/{*reference}", "Remove an image from the catalogue (admin)")
    },
    Operation {
        body: Some("AuditPage"),
        query: &["limit", "after"],
        ..op("GET", "/v1/audit", "One page of audit entries, newest first")
    },
    Operation { status: 201, ..op("POST", "/v1/tokens", "Create an API token (admin)") },
    op("GET", "/v1/tokens", "List API tokens (admin)"),
    op("DELETE", "/v1/tokens/{id}", "Revoke an API token (admin)"),
    Operation {
        query: &["kind"],
        ..op("GET", "/v1/events", "Server-sent domain events; resumes from `Last-Event-ID`")
    },
    op("GET", "/v1/openapi.json", "This document"),
    op("GET", "/v1/health", "Health of the control and data planes"),
    op("GET", "/health/live", "Liveness probe"),
    op("GET", "/health/ready", "Readiness probe (a leader is known)"),
    op("GET", "/metrics", "Prometheus metrics"),
];

fn method(m: &str) -> HttpMethod {
    match m {
        "POST" => HttpMethod::Post,
        "DELETE" => HttpMethod::Delete,
        "PUT" => HttpMethod::Put,
        "PATCH" => HttpMethod::Patch,
        _ => HttpMethod::Get,
    }
}

fn json_ref(name: &str) -> ContentBuilder {
    ContentBuilder::new().schema(Some(Ref::from_schema_name(name)))
}

/// The document (built once).
pub fn document() -> &'static OpenApi {
    static DOC: OnceLock<OpenApi> = OnceLock::new();
    DOC.get_or_init(build)
}

fn build() -> OpenApi {
    let mut paths = Paths::new();
    for o in OPERATIONS {
        // axum's catch-all `{*reference}` is OpenAPI's `{reference}`.
        let path = o.path.replace("{*", "{");
        let op = operation(o, &path);
        paths.add_path_operation(path, vec![method(o.method)], op);
    }
    OpenApiBuilder::new()
        .info(
            InfoBuilder::new()
                .title("holdfast")
                .version(env!("CARGO_PKG_VERSION"))
                .description(Some("The public API of a holdfast manager (README, \"API\")."))
                .build(),
        )
        .paths(paths)
        .components(Some(components()))
        .build()
}

/// `o` as an OpenAPI operation at `path` (OpenAPI syntax): its responses, its path and
/// query parameters, the task spec body of `POST /v1/tasks`, and bearer security
/// everywhere but the health routes.
fn operation(o: &Operation, path: &str) -> utoipa::openapi::path::Operation {
    let mut b = OperationBuilder::new().summary(Some(o.summary)).responses(responses(o));
    if let Some(name) = ["id", "reference"].into_iter().find(|n| path.contains(&format!("{{{n}}}"))) {
        b = b.parameter(
            ParameterBuilder::new()
                .name(name)
                .parameter_in(ParameterIn::Path)
                .required(Required::True)
                .schema(Some(String::schema())),
        );
    }
    for q in o.query {
        b = b.parameter(
            ParameterBuilder::new()
                .name(*q)
                .parameter_in(ParameterIn::Query)
                .schema(Some(if matches!(*q, "limit" | "tail") { u64::schema() } else { String::schema() })),
        );
    }
    if o.method == "POST" && o.path == "/v1/tasks" {
        b = b.request_body(Some(task_spec_body()));
    }
    if !o.path.starts_with("/health") {
        b = b.security(SecurityRequirement::new("bearer", Vec::<String>::new()));
    }
    b.build()
}

/// `o`'s success response, and the error responses any operation may give.
fn responses(o: &Operation) -> utoipa::openapi::Responses {
    let mut ok = ResponseBuilder::new().description(o.summary);
    if let Some(body) = o.body {
        ok = ok.content("application/json", json_ref(body).build());
    }
    let mut responses = ResponsesBuilder::new().response(o.status.to_string(), ok.build());
    for (status, what) in [
        ("400", "A bad parameter or body; `field` names it"),
        ("401", "No or unknown bearer token"),
        ("403", "The token's role may not do this"),
        ("404", "No such object"),
        ("503", "No leader or quorum, or overloaded: retry after `Retry-After`"),
    ] {
        let r = ResponseBuilder::new().description(what).content("application/json", json_ref("ErrorBody").build());
        responses = responses.response(status, r.build());
    }
    responses.build()
}

/// The body of `POST /v1/tasks`: a TaskSpec, described by the README.
fn task_spec_body() -> utoipa::openapi::request_body::RequestBody {
    let spec = RefOr::T(Schema::Object(
        ObjectBuilder::new().schema_type(Type::Object).description(Some("TaskSpec (README, \"Task spec\")")).build(),
    ));
    RequestBodyBuilder::new()
        .content("application/json", ContentBuilder::new().schema(Some(spec)).build())
        .required(Some(Required::True))
        .build()
}

/// The named schemas and the bearer security scheme.
fn components() -> utoipa::openapi::Components {
    ComponentsBuilder::new()
        .schema_from::<ErrorBody>()
        .schema_from::<ErrorDetail>()
        .schema_from::<TaskPage>()
        .schema_from::<AuditPage>()
        .schema_from::<query::TaskView>()
        .schema_from::<query::PlacementView>()
        .schema_from::<query::EventView>()
        .schema_from::<query::AuditEntry>()
        .security_scheme("bearer", SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()))
        .build()
}

/// `GET /v1/openapi.json`.
pub async fn serve() -> Response {
    match document().to_json() {
        Ok(text) => ([(header::CONTENT_TYPE, "application/json")], text).into_response(),
        Err(e) => super::ApiError::internal(format!("cannot render the OpenAPI document: {e}")).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// `(METHOD, path)` of every `.route("path", method(..).method(..))` in `source`.
    fn routes_in(source: &str) -> BTreeSet<(String, String)> {
        let mut out = BTreeSet::new();
        for chunk in source.split(".route(").skip(1) {
            let Some(rest) = chunk.strip_prefix('"') else { continue };
            let Some((path, rest)) = rest.split_once('"') else { continue };
            // The handlers run to the closing parenthesis of `.route(`.
            let mut depth = 1;
            let end = rest
                .char_indices()
                .find(|(_, c)| {
                    match c {
                        '(' => depth += 1,
                        ')' => depth -= 1,
                        _ => {}
                    }
                    depth == 0
                })
                .map_or(rest.len(), |(i, _)| i);
            for m in ["get", "post", "delete", "put", "patch"] {
                let call = format!("{m}(");
                let hit = rest[..end]
                    .match_indices(&call)
                    .any(|(i, _)| i == 0 || !rest[..i].ends_with(|c: char| c.is_alphanumeric() || c == '_'));
                if hit {
                    out.insert((m.to_uppercase(), path.to_string()));
                }
            }
        }
        out
    }

    #[test]
    fn the_document_lists_exactly_the_routes_the_routers_serve() {
        let mut served = routes_in(include_str!("mod.rs"));
        served.extend(routes_in(include_str!("../trust.rs")).into_iter().filter(|(_, p)| p.starts_with("/v1/")));
        served.extend(routes_in(include_str!("images.rs")));
        // The stream's router names its path by a constant.
        assert!(include_str!("events.rs").contains("route(PATH, get(stream)"));
        served.insert(("GET".into(), super::super::events::PATH.into()));
        let documented: BTreeSet<(String, String)> =
            OPERATIONS.iter().map(|o| (o.method.to_string(), o.path.to_string())).collect();
        let undocumented: Vec<_> = served.difference(&documented).collect();
        let unserved: Vec<_> = documented.difference(&served).collect();
        assert!(undocumented.is_empty(), "routes missing from the document: {undocumented:?}");
        assert!(unserved.is_empty(), "documented but not routed: {unserved:?}");
        // The parser itself sees chained methods.
        let chained = routes_in(r#".route("/a", post(x).get(y)).route("/b/{id}", get(z).delete(w))"#);
        assert_eq!(chained.len(), 4);
    }

    #[test]
    fn the_document_is_openapi_with_the_handlers_schemas() {
        let v: serde_json::Value = serde_json::from_str(&document().to_json().expect("json")).expect("parse");
        assert!(v["openapi"].as_str().is_some_and(|s| s.starts_with("3.")), "{}", v["openapi"]);
        let schemas = &v["components"]["schemas"];
        for name in ["TaskView", "PlacementView", "AuditEntry", "ErrorBody", "TaskPage"] {
            assert!(schemas[name].is_object(), "schema {name} missing");
        }
        // Fields come from the serialised types.
        assert!(schemas["TaskView"]["properties"]["placements"].is_object());
        assert!(schemas["AuditEntry"]["properties"]["on_behalf_of"].is_object());
        // The placement's flattened status is part of its schema, not a loose reference.
        let placement = schemas["PlacementView"].to_string();
        for field in ["observed", "exit_code", "reason", "restarts", "endpoints", "container_id", "current", "node"] {
            assert!(placement.contains(&format!("\"{field}\"")), "PlacementView lacks {field}: {placement}");
        }
        assert!(!placement.contains("$ref\":\"#/components/schemas/PlacementStatus"), "{placement}");
        let list = &v["paths"]["/v1/tasks"]["get"];
        assert_eq!(
            list["responses"]["200"]["content"]["application/json"]["schema"]["$ref"],
            "#/components/schemas/TaskPage"
        );
        assert!(v["paths"]["/v1/tasks"]["post"]["responses"]["201"]["description"].is_string());
    }
}
