//! The embedded web UI: the files of `web/` (plain HTML, CSS and ES modules, no build
//! step) compiled into the binary with rust-embed and served at `/` by every manager.
//!
//! - `GET /` (and `/index.html`) answers the page with `Cache-Control: no-cache`; its
//!   asset URLs carry the UI version, `/ui/<version>/<file>`, where the version is a
//!   hash of every embedded file. Those answers are `immutable` for a year: a new binary
//!   with changed files has a new version, so browsers never mix old and new modules.
//!   Modules import each other by relative path, so the version reaches them too.
//! - Every file is gzipped once, the first time the UI is served, and kept in memory; a
//!   client that accepts gzip gets those bytes as they are (no per-request compression).
//! - Every answer carries a strict Content-Security-Policy (only same-origin scripts,
//!   styles and connections, no inline code, no framing), `X-Content-Type-Options:
//!   nosniff` and `Referrer-Policy: no-referrer`.
//!
//! The page itself holds no secret: it asks for an API token and sends it as
//! `Authorization: Bearer` on every API call, so these routes need none.

use std::collections::HashMap;
use std::io::Write;
use std::sync::OnceLock;

use axum::body::Bytes;
use axum::extract::Path;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use rust_embed::RustEmbed;
use sha2::{Digest, Sha256};

use super::ApiError;

#[derive(RustEmbed)]
#[folder = "web/"]
struct Files;

/// Files of `web/` that are documentation, not part of the UI.
const NOT_SERVED: &[&str] = &["README.md"];

/// The page's policy: nothing from elsewhere, nothing inline, never in a frame.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// Placeholder in `web/index.html` replaced by the UI version.
const VERSION_MARK: &str = "__UI_VERSION__";

/// One file, ready to send.
struct Asset {
    /// Uncompressed bytes.
    plain: Bytes,
    /// Gzipped bytes, when that is smaller.
    gzip: Option<Bytes>,
    /// `Content-Type`.
    mime: &'static str,
}

struct Ui {
    /// Hash of every embedded file; part of every asset URL.
    version: String,
    /// `index.html` with the version filled in.
    index: Asset,
    /// Every other file by its path under `web/`.
    files: HashMap<String, Asset>,
}

fn mime(path: &str) -> &'static str {
    match path.rsplit('.').next().unwrap_or_default() {
        "html" => "text/html; charset=utf-8",
        "js" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "svg" => "image/svg+xml",
        "json" => "application/json",
        "png" => "image/png",
        "ico" => "image/x-icon",
        _ => "application/octet-stream",
    }
}

fn asset(path: &str, plain: Vec<u8>) -> Asset {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    // Writing to a Vec cannot fail; a failure would only cost the compressed copy.
    let gzip = enc.write_all(&plain).and_then(|_| enc.finish()).ok().filter(|g| g.len() < plain.len()).map(Bytes::from);
    Asset { plain: Bytes::from(plain), gzip, mime: mime(path) }
}

fn ui() -> &'static Ui {
    static UI: OnceLock<Ui> = OnceLock::new();
    UI.get_or_init(|| {
        let mut names: Vec<String> =
            Files::iter().map(|n| n.into_owned()).filter(|n| !NOT_SERVED.contains(&n.as_str())).collect();
        names.sort();
        let mut hash = Sha256::new();
        for n in &names {
            if let Some(f) = Files::get(n) {
                hash.update(n.as_bytes());
                hash.update(f.metadata.sha256_hash());
            }
        }
        let version: String = hash.finalize().iter().take(6).map(|b| format!("{b:02x}")).collect();
        let mut files = HashMap::new();
        let mut index = asset("index.html", b"<!doctype html><title>holdfast</title><p>UI missing".to_vec());
        for n in names {
            let Some(f) = Files::get(&n) else { continue };
            if n == "index.html" {
                let text = String::from_utf8_lossy(&f.data).replace(VERSION_MARK, &version);
                index = asset(&n, text.into_bytes());
            } else {
                files.insert(n.clone(), asset(&n, f.data.into_owned()));
            }
        }
        Ui { version, index, files }
    })
}

/// The UI version: a hash of the embedded files (also in every asset URL).
pub fn version() -> &'static str {
    &ui().version
}

/// Routes of the UI. Merge into the API router; they need no state.
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new().route("/", get(index)).route("/index.html", get(index)).route("/ui/{version}/{*path}", get(file))
}

fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers.get_all(header::ACCEPT_ENCODING).iter().filter_map(|v| v.to_str().ok()).any(|v| {
        v.split(',').any(|part| {
            let mut it = part.split(';');
            let coding = it.next().unwrap_or_default().trim();
            let refused = it.any(|p| matches!(p.trim(), "q=0" | "q=0.0" | "q=0.00" | "q=0.000"));
            (coding.eq_ignore_ascii_case("gzip") || coding == "*") && !refused
        })
    })
}

fn send(a: &Asset, headers: &HeaderMap, cache: &'static str) -> Response {
    let (body, gzipped) = match &a.gzip {
        Some(g) if accepts_gzip(headers) => (g.clone(), true),
        _ => (a.plain.clone(), false),
    };
    let mut resp = (StatusCode::OK, body).into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(a.mime));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    h.insert(header::VARY, HeaderValue::from_static("Accept-Encoding"));
    if gzipped {
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    }
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    resp
}

async fn index(headers: HeaderMap) -> Response {
    send(&ui().index, &headers, "no-cache")
}

async fn file(Path((version, path)): Path<(String, String)>, headers: HeaderMap) -> Response {
    let ui = ui();
    let Some(a) = ui.files.get(&path) else {
        return ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("the UI has no file {path:?}"))
            .into_response();
    };
    // A page from an older binary may still ask for its version: answer with today's
    // file, but do not let anything keep it.
    let cache = if version == ui.version { "public, max-age=31536000, immutable" } else { "no-cache" };
    send(a, &headers, cache)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(accept: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::ACCEPT_ENCODING, HeaderValue::from_str(accept).expect("header"));
        h
    }

    #[test]
    fn gzip_is_sent_only_to_clients_that_accept_it() {
        for (accept, want) in [
            ("gzip, deflate, br", true),
            ("br;q=1.0, GZIP;q=0.5", true),
            ("*", true),
            ("gzip;q=0", false),
            ("deflate, br", false),
            ("", false),
        ] {
            assert_eq!(accepts_gzip(&headers(accept)), want, "{accept:?}");
        }
    }

    #[test]
    fn the_page_names_its_versioned_assets_and_every_asset_exists() {
        let ui = ui();
        let page = String::from_utf8(ui.index.plain.to_vec()).expect("utf-8");
        assert!(!page.contains(VERSION_MARK));
        let prefix = format!("/ui/{}/", ui.version);
        let refs: Vec<&str> = page.split(&prefix).skip(1).filter_map(|s| s.split('"').next()).collect();
        assert!(refs.len() >= 2, "the page links its script and style: {page}");
        for r in refs {
            assert!(ui.files.contains_key(r), "{r} is linked but not embedded");
        }
        // No inline code: the policy would refuse it anyway.
        assert!(!page.contains("<script>") && !page.contains("<style") && !page.contains(" style="));
    }

    #[test]
    fn all_assets_stay_within_the_150_kb_budget_and_gzip_round_trips() {
        let ui = ui();
        let total: usize = ui.files.values().map(|a| a.plain.len()).sum::<usize>() + ui.index.plain.len();
        assert!(total <= 150 * 1024, "UI assets are {total} bytes; the budget is 150 KB");
        for (name, a) in &ui.files {
            if let Some(g) = &a.gzip {
                let mut out = Vec::new();
                std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&g[..]), &mut out).expect("gunzip");
                assert_eq!(out, a.plain, "{name}");
            }
        }
    }
}
