//! Images without a registry, manager side (ARCHITECTURE.md "Images without a
//! registry"): the content-addressed blob store on this manager's disk, the streamed
//! ingest of a `docker save` archive, the cluster-port routes workers and other
//! managers fetch from, and the background loop that copies missing blobs from other
//! managers, drops unreferenced ones and (on the leader) retires unused images.
//!
//! Blobs never enter the Raft log: only the catalogue (`state::images`) does, and a
//! catalogue entry is written only after every blob it names is stored and verified
//! here.

use std::collections::{BTreeSet, HashMap};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::body::Body;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use sha2::{Digest, Sha256};
use tokio::sync::broadcast;

use super::api::ApiError;
use super::state::images as catalogue;
use super::Manager;
use crate::model::sync::{normalize_image_ref, CatalogueEntry, LayerRef};
use crate::net::identity::NodeTls;

/// Where blobs live: `<dir>/sha256/<hex>`, partial writes in `<dir>/tmp/`.
#[derive(Clone, Debug)]
pub struct BlobStore {
    dir: PathBuf,
    /// Free bytes that must remain on the file system after a write (`--min-free-mb`).
    pub min_free_bytes: u64,
}

/// Why an upload was refused; each maps to one status and code in the API.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The bytes are no tar archive at all.
    #[error("not a tar archive: {0}")]
    NotATar(String),
    /// A tar, but not what `docker save` writes.
    #[error("not a docker save archive: {0}")]
    NotDockerSave(String),
    /// A blob's content does not match the digest the archive names for it.
    #[error("digest mismatch: {0}")]
    DigestMismatch(String),
    /// The upload ended before the archive did.
    #[error("truncated upload: {0}")]
    Truncated(String),
    /// Storing it would eat into the manager's disk reserve.
    #[error("not enough disk on this manager: {free} bytes free above the reserve, {need} needed")]
    NoSpace {
        /// Bytes needed (at least).
        need: u64,
        /// Bytes free above the reserve.
        free: u64,
    },
    /// Local storage failed.
    #[error("blob store: {0}")]
    Io(String),
}

impl IngestError {
    /// HTTP status and error code for the API.
    pub fn status(&self) -> (StatusCode, &'static str) {
        match self {
            IngestError::NotATar(_) => (StatusCode::BAD_REQUEST, "not_a_tar"),
            IngestError::NotDockerSave(_) => (StatusCode::BAD_REQUEST, "not_docker_save"),
            IngestError::DigestMismatch(_) => (StatusCode::UNPROCESSABLE_ENTITY, "digest_mismatch"),
            IngestError::Truncated(_) => (StatusCode::BAD_REQUEST, "truncated"),
            IngestError::NoSpace { .. } => (StatusCode::INSUFFICIENT_STORAGE, "insufficient_storage"),
            IngestError::Io(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

/// Hex of a SHA-256 state.
fn hex_of(h: Sha256) -> String {
    hex::encode(h.finalize())
}

/// How often (bytes written) a long write re-checks the disk reserve.
const SPACE_CHECK_EVERY: u64 = 16 << 20;
/// A JSON file of the archive kept in memory is at most this big.
const MAX_JSON: u64 = 4 << 20;
/// Unreferenced blobs and stale partial writes older than this are deleted (a push
/// stores blobs a moment before its catalogue entry commits).
const ORPHAN_AGE: Duration = Duration::from_secs(600);

impl BlobStore {
    /// A store under `dir` (created on first write).
    pub fn new(dir: PathBuf, min_free_bytes: u64) -> Self {
        BlobStore { dir, min_free_bytes }
    }

    /// Path of a stored blob, `None` for a malformed digest.
    pub fn path(&self, digest: &str) -> Option<PathBuf> {
        catalogue::valid_digest(digest).then(|| self.dir.join("sha256").join(&digest[7..]))
    }

    /// Whether the blob is stored here.
    pub fn has(&self, digest: &str) -> bool {
        self.path(digest).is_some_and(|p| p.is_file())
    }

    /// Size of a stored blob.
    pub fn size(&self, digest: &str) -> Option<u64> {
        std::fs::metadata(self.path(digest)?).ok().map(|m| m.len())
    }

    fn tmp(&self) -> std::io::Result<PathBuf> {
        let t = self.dir.join("tmp");
        std::fs::create_dir_all(&t)?;
        std::fs::create_dir_all(self.dir.join("sha256"))?;
        Ok(t.join(uuid::Uuid::new_v4().simple().to_string()))
    }

    /// Bytes free on the store's file system above the reserve.
    pub fn free_above_reserve(&self) -> u64 {
        let probe = if self.dir.exists() {
            self.dir.clone()
        } else {
            self.dir.parent().unwrap_or(Path::new("/")).to_path_buf()
        };
        match rustix::fs::statvfs(&probe) {
            Ok(s) => s.f_bavail.saturating_mul(s.f_frsize).saturating_sub(self.min_free_bytes),
            Err(_) => 0,
        }
    }

    /// Copies `r` into a temporary file while hashing, checking the reserve as it goes;
    /// with `keep`, the first [`MAX_JSON`] bytes are kept in memory too.
    fn write_hashed(&self, r: &mut impl Read, keep: bool) -> Result<ArchiveFile, IngestError> {
        let path = self.tmp().map_err(|e| IngestError::Io(e.to_string()))?;
        let mut file = std::fs::File::create(&path).map_err(|e| IngestError::Io(e.to_string()))?;
        let mut hash = Sha256::new();
        let mut buf = vec![0u8; 256 << 10];
        let mut total = 0u64;
        let mut next_check = 0u64;
        let mut kept = keep.then(Vec::new);
        let result = (|| loop {
            let n = match r.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(read_error(e)),
            };
            if total >= next_check {
                let free = self.free_above_reserve();
                if free < SPACE_CHECK_EVERY {
                    return Err(IngestError::NoSpace { need: SPACE_CHECK_EVERY, free });
                }
                next_check = total + SPACE_CHECK_EVERY;
            }
            hash.update(&buf[..n]);
            file.write_all(&buf[..n]).map_err(write_error)?;
            if let Some(k) = kept.as_mut() {
                if (k.len() as u64) < MAX_JSON {
                    k.extend_from_slice(&buf[..n]);
                }
            }
            total += n as u64;
        })();
        if let Err(e) = result {
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        Ok(ArchiveFile { tmp: path, hex: hex_of(hash), size: total, json: kept })
    }

    /// Moves a verified temp file into place (or drops it if the blob is there already).
    fn commit(&self, tmp: &Path, hex: &str) -> Result<(), IngestError> {
        let dest = self.dir.join("sha256").join(hex);
        if dest.is_file() {
            let _ = std::fs::remove_file(tmp);
            return Ok(());
        }
        std::fs::rename(tmp, &dest).map_err(|e| IngestError::Io(e.to_string()))
    }

    /// Every stored digest.
    pub fn stored(&self) -> Vec<String> {
        let Ok(rd) = std::fs::read_dir(self.dir.join("sha256")) else { return Vec::new() };
        rd.filter_map(|e| e.ok()).filter_map(|e| e.file_name().to_str().map(|h| format!("sha256:{h}"))).collect()
    }

    /// Deletes blobs nothing references and stale partial writes, both older than
    /// [`ORPHAN_AGE`]. Returns how many files went.
    pub fn collect_garbage(&self, referenced: &BTreeSet<String>) -> usize {
        let old = |p: &Path| {
            std::fs::metadata(p)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| SystemTime::now().duration_since(t).ok())
                .is_some_and(|age| age > ORPHAN_AGE)
        };
        let mut gone = 0;
        for d in self.stored() {
            if let Some(p) = self.path(&d) {
                if !referenced.contains(&d) && old(&p) && std::fs::remove_file(&p).is_ok() {
                    gone += 1;
                }
            }
        }
        if let Ok(rd) = std::fs::read_dir(self.dir.join("tmp")) {
            for e in rd.flatten() {
                if old(&e.path()) && std::fs::remove_file(e.path()).is_ok() {
                    gone += 1;
                }
            }
        }
        gone
    }
}

fn read_error(e: std::io::Error) -> IngestError {
    IngestError::Truncated(format!("the upload stopped before the archive ended ({e})"))
}

fn write_error(e: std::io::Error) -> IngestError {
    if e.raw_os_error() == Some(libc::ENOSPC) {
        IngestError::NoSpace { need: 0, free: 0 }
    } else {
        IngestError::Io(e.to_string())
    }
}

/// One file of the archive, as written to a temp file.
struct ArchiveFile {
    tmp: PathBuf,
    hex: String,
    size: u64,
    json: Option<Vec<u8>>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ManifestItem {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

#[derive(serde::Deserialize)]
struct ImageConfig {
    rootfs: RootFs,
}

#[derive(serde::Deserialize)]
struct RootFs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

/// Joins an archive path (or a link target relative to `base`) into a clean,
/// relative path without `.` or `..`.
fn clean(base: &str, p: &str) -> String {
    let mut parts: Vec<&str> =
        if p.starts_with('/') { Vec::new() } else { base.split('/').filter(|s| !s.is_empty()).collect() };
    for s in p.split('/') {
        match s {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            s => parts.push(s),
        }
    }
    parts.join("/")
}

/// The hex a path names itself by (`blobs/sha256/<hex>`, `<hex>.json`), if any.
fn named_hex(path: &str) -> Option<&str> {
    let name = path.rsplit('/').next()?;
    let name = name.strip_suffix(".json").unwrap_or(name);
    (name.len() == 64
        && name.bytes().all(|b| b.is_ascii_hexdigit())
        && (path.starts_with("blobs/sha256/") || path.ends_with(".json")))
    .then_some(name)
}

/// Reads a `docker save` archive (optionally gzipped) from `input` as it arrives,
/// stores config and layer blobs verified by digest, and returns the catalogue
/// entries it makes (one per tag). Nothing is left behind on failure except blobs
/// already verified (collected later if nothing references them). A layer whose
/// file the archive leaves out is accepted when the store already holds its blob
/// (`holdfast image push` omits layers the managers have).
pub fn ingest<'a>(store: &BlobStore, input: impl Read + 'a) -> Result<Vec<CatalogueEntry>, IngestError> {
    let ended = std::rc::Rc::new(std::cell::Cell::new(false));
    let input = Ends { inner: input, ended: ended.clone() };
    let mut input = std::io::BufReader::with_capacity(256 << 10, input);
    let gz = {
        let head = std::io::BufRead::fill_buf(&mut input).map_err(read_error)?;
        head.starts_with(&[0x1f, 0x8b])
    };
    let reader: Box<dyn Read + 'a> = if gz { Box::new(flate2::read::GzDecoder::new(input)) } else { Box::new(input) };
    let mut files: HashMap<String, ArchiveFile> = HashMap::new();
    let mut links: HashMap<String, String> = HashMap::new();
    let result =
        read_archive(store, reader, &mut files, &mut links, &ended).and_then(|()| entries_of(store, &files, &links));
    let used: BTreeSet<String> = match &result {
        Ok((_, used)) => used.clone(),
        Err(_) => BTreeSet::new(),
    };
    let mut commit_error = None;
    for (path, f) in &files {
        if used.contains(path) {
            if let Err(e) = store.commit(&f.tmp, &f.hex) {
                commit_error.get_or_insert(e);
            }
        } else {
            let _ = std::fs::remove_file(&f.tmp);
        }
    }
    match (result, commit_error) {
        (Err(e), _) | (Ok(_), Some(e)) => Err(e),
        (Ok((entries, _)), None) => Ok(entries),
    }
}

fn read_archive(
    store: &BlobStore,
    reader: Box<dyn Read + '_>,
    files: &mut HashMap<String, ArchiveFile>,
    links: &mut HashMap<String, String>,
    ended: &std::cell::Cell<bool>,
) -> Result<(), IngestError> {
    let tar_error = |e| tar_error(e, ended.get());
    let mut archive = tar::Archive::new(reader);
    let entries = archive.entries().map_err(|e| IngestError::NotATar(e.to_string()))?;
    for entry in entries {
        let mut entry = entry.map_err(tar_error)?;
        let path = entry.path().map_err(tar_error)?.to_string_lossy().to_string();
        let path = clean("", &path);
        match entry.header().entry_type() {
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let keep = path.ends_with(".json") && entry.size() <= MAX_JSON;
                let file = store.write_hashed(&mut entry, keep)?;
                if file.size != entry.size() {
                    let _ = std::fs::remove_file(&file.tmp);
                    return Err(IngestError::Truncated(format!("{path}: {} of {} bytes", file.size, entry.size())));
                }
                if let Some(old) = files.insert(path, file) {
                    let _ = std::fs::remove_file(old.tmp);
                }
            }
            tar::EntryType::Symlink | tar::EntryType::Link => {
                if let Some(target) = entry.link_name().map_err(tar_error)? {
                    let target = target.to_string_lossy().to_string();
                    let base = if entry.header().entry_type() == tar::EntryType::Link {
                        String::new()
                    } else {
                        path.rsplit_once('/').map(|(d, _)| d.to_string()).unwrap_or_default()
                    };
                    links.insert(path, clean(&base, &target));
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// Why the bytes of an upload stopped coming. The API's body stream hands it to the
/// archive reader inside an `io::Error`, so ingest tells a cut from a bad archive by
/// type.
#[derive(Debug, thiserror::Error)]
pub enum UploadCut {
    /// The connection failed mid-body.
    #[error("upload interrupted: {0}")]
    Interrupted(String),
    /// No bytes arrived for this long.
    #[error("upload stalled for {0:?}")]
    Stalled(Duration),
}

/// A reader that remembers whether its source has ended. The tar crate reports an
/// archive cut short only in text ("failed to read entire block"), so a tar error after
/// the end of the input is taken for a truncated upload instead.
struct Ends<R> {
    inner: R,
    ended: std::rc::Rc<std::cell::Cell<bool>>,
}

impl<R: Read> Read for Ends<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && !buf.is_empty() {
            self.ended.set(true);
        }
        Ok(n)
    }
}

/// A tar error: a truncated upload when the input had ended, the connection was cut
/// ([`UploadCut`]) or a read came up short; otherwise not an archive.
fn tar_error(e: std::io::Error, input_ended: bool) -> IngestError {
    let cut = e.get_ref().is_some_and(|inner| inner.is::<UploadCut>());
    if input_ended || cut || e.kind() == std::io::ErrorKind::UnexpectedEof {
        read_error(e)
    } else {
        IngestError::NotATar(e.to_string())
    }
}

/// Resolves links (at most a few hops) to the file they name.
fn resolve<'a>(
    files: &'a HashMap<String, ArchiveFile>,
    links: &HashMap<String, String>,
    path: &str,
) -> Option<(&'a str, &'a ArchiveFile)> {
    let mut p = clean("", path);
    for _ in 0..8 {
        if let Some((k, f)) = files.get_key_value(&p) {
            return Some((k.as_str(), f));
        }
        p = links.get(&p)?.clone();
    }
    None
}

type Entries = (Vec<CatalogueEntry>, BTreeSet<String>);

fn entries_of(
    store: &BlobStore,
    files: &HashMap<String, ArchiveFile>,
    links: &HashMap<String, String>,
) -> Result<Entries, IngestError> {
    let items = manifest_of(files)?;
    let mut out = Vec::new();
    let mut used = BTreeSet::new();
    let mut not_sent = 0usize;
    for mut item in items {
        let tags = item.repo_tags.take().unwrap_or_default();
        if tags.is_empty() {
            return Err(IngestError::NotDockerSave(
                "an image in the archive has no tag; save it by name (`docker save NAME:TAG`)".into(),
            ));
        }
        let (cfg_path, cfg, config) = config_of(files, links, &item)?;
        used.insert(cfg_path.to_string());
        let mut layers = Vec::new();
        for (layer_path, diff_id) in item.layers.iter().zip(&config.rootfs.diff_ids) {
            let (layer, from) = layer_of(store, files, links, layer_path, diff_id)?;
            match from {
                Some(p) => {
                    used.insert(p.to_string());
                }
                None => not_sent += 1,
            }
            layers.push(layer);
        }
        for tag in tags {
            let entry = CatalogueEntry {
                reference: normalize_image_ref(&tag),
                config_digest: format!("sha256:{}", cfg.hex),
                config_size: cfg.size,
                layers: layers.clone(),
            };
            if let Some(why) = catalogue::check_entry(&entry) {
                return Err(IngestError::NotDockerSave(why));
            }
            out.push(entry);
        }
    }
    let refs: Vec<&str> = out.iter().map(|e| e.reference.as_str()).collect();
    tracing::info!(images = ?refs, layers_not_sent = not_sent, "image push verified");
    Ok((out, used))
}

/// The images `manifest.json` lists: at least one.
fn manifest_of(files: &HashMap<String, ArchiveFile>) -> Result<Vec<ManifestItem>, IngestError> {
    let manifest = files.get("manifest.json").and_then(|f| f.json.as_ref()).ok_or_else(|| {
        IngestError::NotDockerSave("it has no manifest.json (make it with `docker save NAME:TAG`)".into())
    })?;
    let items: Vec<ManifestItem> = serde_json::from_slice(manifest)
        .map_err(|e| IngestError::NotDockerSave(format!("manifest.json is not a docker save manifest: {e}")))?;
    if items.is_empty() {
        return Err(IngestError::NotDockerSave("manifest.json lists no image".into()));
    }
    Ok(items)
}

/// `item`'s config: in the archive, hashing to the digest in its name, an image config
/// listing as many layers as the manifest. Its path, its file and the config.
fn config_of<'a>(
    files: &'a HashMap<String, ArchiveFile>,
    links: &HashMap<String, String>,
    item: &ManifestItem,
) -> Result<(&'a str, &'a ArchiveFile, ImageConfig), IngestError> {
    let (cfg_path, cfg) = resolve(files, links, &item.config)
        .ok_or_else(|| IngestError::NotDockerSave(format!("config {} is missing from the archive", item.config)))?;
    if let Some(h) = named_hex(&item.config) {
        if h != cfg.hex {
            return Err(IngestError::DigestMismatch(format!("config {} hashes to sha256:{}", item.config, cfg.hex)));
        }
    }
    let json =
        cfg.json.as_ref().ok_or_else(|| IngestError::NotDockerSave(format!("config {} is not JSON", item.config)))?;
    let config: ImageConfig = serde_json::from_slice(json)
        .map_err(|e| IngestError::NotDockerSave(format!("config {} is not an image config: {e}", item.config)))?;
    if config.rootfs.diff_ids.len() != item.layers.len() {
        return Err(IngestError::NotDockerSave(format!(
            "the config lists {} layers, the manifest {}",
            config.rootfs.diff_ids.len(),
            item.layers.len()
        )));
    }
    Ok((cfg_path, cfg, config))
}

/// The layer at `layer_path` with the config's `diff_id`: from the archive, hashing to
/// `diff_id` (and to the digest in its name), or, left out of the archive, already
/// stored on this manager. The archive path it came from, if it did.
fn layer_of<'a>(
    store: &BlobStore,
    files: &'a HashMap<String, ArchiveFile>,
    links: &HashMap<String, String>,
    layer_path: &str,
    diff_id: &str,
) -> Result<(LayerRef, Option<&'a str>), IngestError> {
    if !catalogue::valid_digest(diff_id) {
        return Err(IngestError::NotDockerSave(format!("layer id {diff_id:?} is not a sha256 digest")));
    }
    match resolve(files, links, layer_path) {
        Some((p, f)) => {
            if format!("sha256:{}", f.hex) != *diff_id {
                return Err(IngestError::DigestMismatch(format!(
                    "layer {layer_path} hashes to sha256:{}, the config says {diff_id}",
                    f.hex
                )));
            }
            if let Some(h) = named_hex(layer_path) {
                if h != f.hex {
                    return Err(IngestError::DigestMismatch(format!("layer {layer_path} hashes to sha256:{}", f.hex)));
                }
            }
            Ok((LayerRef { digest: diff_id.to_string(), size: f.size }, Some(p)))
        }
        None => match store.size(diff_id) {
            Some(size) => Ok((LayerRef { digest: diff_id.to_string(), size }, None)),
            None => Err(IngestError::NotDockerSave(format!(
                "layer {layer_path} is missing from the archive and not stored on this manager"
            ))),
        },
    }
}

/// Records the image ids a worker reported in its sync (kept in memory, like
/// heartbeats; the scheduler reads them).
pub fn note_held(m: &Manager, node: &str, ids: &[String]) {
    let mut held = super::lock(&m.held_images);
    let same = held.get(node).is_some_and(|h| h.len() == ids.len() && ids.iter().all(|i| h.contains(i)));
    if !same {
        held.insert(node.to_string(), Arc::new(ids.iter().cloned().collect()));
    }
}

/// The image ids every worker last reported.
pub fn held_snapshot(m: &Manager) -> HashMap<String, Arc<std::collections::HashSet<String>>> {
    super::lock(&m.held_images).clone()
}

/// Cluster-port routes: the catalogue entry for a reference and the blobs, for
/// workers and other managers (behind `net::door`: any node of the cluster).
pub fn cluster_router(manager: Arc<Manager>) -> Router {
    Router::new()
        .route("/cluster/v1/images/entry", get(entry))
        .route("/cluster/v1/blobs/{digest}", get(blob))
        .with_state(manager)
}

#[derive(serde::Deserialize)]
struct EntryQuery {
    reference: String,
}

async fn entry(State(m): State<Arc<Manager>>, Query(q): Query<EntryQuery>) -> Result<Response, ApiError> {
    let reference = normalize_image_ref(&q.reference);
    if !catalogue::valid_reference(&reference) {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "invalid", "not an image reference").field("reference"));
    }
    let key = reference.clone();
    let row = m.db.read_local(move |c| catalogue::get(c, &key)).await?;
    match row {
        Some(r) => Ok(Json(r.entry).into_response()),
        None => {
            Err(ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no image {reference} in the catalogue")))
        }
    }
}

/// Parses `bytes=N-` (the only range form the fetchers send).
fn range_start(headers: &HeaderMap) -> Option<u64> {
    headers.get(header::RANGE)?.to_str().ok()?.strip_prefix("bytes=")?.strip_suffix('-')?.parse().ok()
}

async fn blob(
    State(m): State<Arc<Manager>>,
    UrlPath(digest): UrlPath<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let path = m.blobs.path(&digest).ok_or_else(|| {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid", "a blob is named sha256:<64 hex>").field("digest")
    })?;
    let mut file = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(_) => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("blob {digest} is not on this manager (yet)"),
            ))
        }
    };
    let len = file.metadata().await.map_err(|e| ApiError::internal(e.to_string()))?.len();
    let start = range_start(&headers).unwrap_or(0);
    if start > len {
        return Err(ApiError::new(
            StatusCode::RANGE_NOT_SATISFIABLE,
            "bad_range",
            format!("blob {digest} has {len} bytes"),
        ));
    }
    use tokio::io::AsyncSeekExt;
    file.seek(std::io::SeekFrom::Start(start)).await.map_err(|e| ApiError::internal(e.to_string()))?;
    let body = Body::from_stream(tokio_util::io::ReaderStream::with_capacity(file, 256 << 10));
    let status = if start > 0 { StatusCode::PARTIAL_CONTENT } else { StatusCode::OK };
    let mut resp = (status, body).into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/octet-stream"));
    if let Ok(v) = header::HeaderValue::from_str(&(len - start).to_string()) {
        h.insert(header::CONTENT_LENGTH, v);
    }
    if start > 0 {
        if let Ok(v) = header::HeaderValue::from_str(&format!("bytes {start}-{}/{len}", len.saturating_sub(1))) {
            h.insert(header::CONTENT_RANGE, v);
        }
    }
    Ok(resp)
}

/// Settings of the background image loop.
#[derive(Clone, Debug)]
pub struct ImageLoop {
    /// Between rounds.
    pub every: Duration,
    /// An image no task has used for this long is removed (leader only).
    pub retain: Duration,
    /// One blob copy from a peer may take at most this long.
    pub copy_timeout: Duration,
}

impl Default for ImageLoop {
    fn default() -> Self {
        ImageLoop {
            every: Duration::from_secs(2),
            retain: Duration::from_secs(24 * 3600),
            copy_timeout: Duration::from_secs(600),
        }
    }
}

/// Runs the copier (every manager), garbage collection and retention (leader) until
/// `stop` fires.
pub async fn run_loop(m: Arc<Manager>, tls: Arc<NodeTls>, settings: ImageLoop, mut stop: broadcast::Receiver<()>) {
    let mut last_gc = std::time::Instant::now();
    let mut last_retention = std::time::Instant::now();
    loop {
        tokio::select! {
            _ = stop.recv() => return,
            _ = tokio::time::sleep(settings.every) => {}
        }
        let referenced = match m.db.read_local(catalogue::referenced_blobs).await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "image loop: cannot read the catalogue");
                continue;
            }
        };
        for digest in referenced.iter().filter(|d| !m.blobs.has(d)) {
            if let Err(e) = copy_from_peers(&m, &tls, digest, settings.copy_timeout).await {
                tracing::debug!(%digest, error = %e, "blob not copied yet");
            }
        }
        if last_gc.elapsed() > Duration::from_secs(60) {
            last_gc = std::time::Instant::now();
            let store = m.blobs.clone();
            let gone = tokio::task::spawn_blocking(move || store.collect_garbage(&referenced)).await.unwrap_or(0);
            if gone > 0 {
                tracing::info!(gone, "removed unreferenced image blobs");
            }
        }
        let every = (settings.retain / 10).clamp(Duration::from_millis(200), Duration::from_secs(60));
        if m.db.status().role == holdfast_raft::Role::Leader && last_retention.elapsed() >= every {
            last_retention = std::time::Instant::now();
            retire_unused(&m, settings.retain).await;
        }
    }
}

/// Removes images no task has wanted for `retain` (the apply re-checks).
async fn retire_unused(m: &Manager, retain: Duration) {
    let now = super::now_ms();
    let since = now.saturating_sub(retain.as_millis() as u64);
    let rows =
        m.db.read_local(move |c| {
            let mut out = Vec::new();
            for r in catalogue::list(c)? {
                let used = catalogue::users(c, &r.entry.reference)?;
                let last = catalogue::last_used_ms(c, &r.entry.reference)?.unwrap_or(0);
                if used.is_empty() && r.pushed_ms <= since && last <= since {
                    out.push(r.entry.reference);
                }
            }
            Ok(out)
        })
        .await
        .unwrap_or_default();
    for reference in rows {
        let cmd = super::state::Command::Image(catalogue::ImageCommand::Remove {
            reference: reference.clone(),
            force: false,
            unused_since_ms: Some(since),
            now_ms: now,
        });
        match super::write::replicate_only(&m.db, &cmd).await {
            Ok(()) => tracing::info!(%reference, "image unused past its retention; removed from the catalogue"),
            Err(error) => tracing::debug!(%reference, %error, "image not retired"),
        }
    }
}

/// Fetches one blob from any other manager that has it, verifying its digest.
async fn copy_from_peers(m: &Manager, tls: &NodeTls, digest: &str, timeout: Duration) -> Result<(), String> {
    let status = m.db.status();
    let me = status.name.clone();
    let peers: Vec<String> =
        status.members.iter().filter(|mm| mm.member.name != me).map(|mm| mm.member.cluster_addr.clone()).collect();
    let mut last = "no other manager".to_string();
    for addr in peers {
        match tokio::time::timeout(timeout, copy_one(m, tls, &addr, digest)).await {
            Ok(Ok(bytes)) => {
                tracing::info!(%digest, from = %addr, bytes, "copied image blob");
                return Ok(());
            }
            Ok(Err(e)) => last = format!("{addr}: {e}"),
            Err(_) => last = format!("{addr}: timed out after {timeout:?}"),
        }
    }
    Err(last)
}

async fn copy_one(m: &Manager, tls: &NodeTls, addr: &str, digest: &str) -> Result<u64, String> {
    let url = format!("https://{addr}/cluster/v1/blobs/{digest}");
    let mut resp = tls.http().get(&url).send().await.map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("{}", resp.status()));
    }
    let store = m.blobs.clone();
    if let Some(len) = resp.content_length() {
        let free = store.free_above_reserve();
        if len > free {
            return Err(format!("not enough disk: {len} bytes needed, {free} free above the reserve"));
        }
    }
    let tmp = store.tmp().map_err(|e| e.to_string())?;
    let mut file = tokio::fs::File::create(&tmp).await.map_err(|e| e.to_string())?;
    let mut hash = Sha256::new();
    let mut total = 0u64;
    let result: Result<(), String> = async {
        use tokio::io::AsyncWriteExt;
        while let Some(chunk) = tokio::time::timeout(Duration::from_secs(30), resp.chunk())
            .await
            .map_err(|_| "no data for 30 s".to_string())?
            .map_err(|e| e.to_string())?
        {
            hash.update(&chunk);
            file.write_all(&chunk).await.map_err(|e| e.to_string())?;
            total += chunk.len() as u64;
        }
        file.flush().await.map_err(|e| e.to_string())
    }
    .await;
    let hex = hex_of(hash);
    if let Err(e) = result {
        let _ = tokio::fs::remove_file(&tmp).await;
        return Err(e);
    }
    if format!("sha256:{hex}") != digest {
        let _ = tokio::fs::remove_file(&tmp).await;
        return Err(format!("digest mismatch: got sha256:{hex}"));
    }
    store.commit(&tmp, &hex).map_err(|e| e.to_string())?;
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_cleaned_and_links_resolved_inside_the_archive() {
        assert_eq!(clean("", "./a/b/../c"), "a/c");
        assert_eq!(clean("x/y", "../z/layer.tar"), "x/z/layer.tar");
        assert_eq!(clean("x", "/../../etc/passwd"), "etc/passwd");
        let hex = "a".repeat(64);
        assert_eq!(named_hex(&format!("blobs/sha256/{hex}")), Some(hex.as_str()));
        assert_eq!(named_hex(&format!("{hex}.json")), Some(hex.as_str()));
        assert_eq!(named_hex("abc/layer.tar"), None);
    }

    fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, name, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn sha(b: &[u8]) -> String {
        hex::encode(Sha256::digest(b))
    }

    /// A minimal docker save archive: one layer, one config, a manifest.
    fn archive(layer: &[u8], claimed_diff_id: Option<String>) -> Vec<u8> {
        let diff_id = claimed_diff_id.unwrap_or_else(|| format!("sha256:{}", sha(layer)));
        let config =
            serde_json::to_vec(&serde_json::json!({"rootfs": {"type": "layers", "diff_ids": [diff_id]}})).unwrap();
        let cfg_name = format!("{}.json", sha(&config));
        let manifest = serde_json::to_vec(&serde_json::json!([
            {"Config": cfg_name, "RepoTags": ["app:1"], "Layers": ["abc/layer.tar"]}
        ]))
        .unwrap();
        tar_of(&[("abc/layer.tar", layer), (&cfg_name, &config), ("manifest.json", &manifest)])
    }

    fn store() -> (tempfile::TempDir, BlobStore) {
        let dir = tempfile::tempdir().unwrap();
        let s = BlobStore::new(dir.path().join("blobs"), 0);
        (dir, s)
    }

    #[test]
    fn ingest_checks_every_kind_of_bad_input() {
        let layer = tar_of(&[("hello.txt", b"hello")]);
        let good = archive(&layer, None);
        type Check = fn(&IngestError) -> bool;
        let cases: Vec<(&str, Vec<u8>, Check)> = vec![
            ("not a tar", b"this is not an archive at all, just some text".repeat(20), |e| {
                matches!(e, IngestError::NotATar(_) | IngestError::NotDockerSave(_))
            }),
            ("a tar without manifest", tar_of(&[("a.txt", b"x")]), |e| matches!(e, IngestError::NotDockerSave(_))),
            ("layer digest mismatch", archive(&layer, Some(format!("sha256:{}", "0".repeat(64)))), |e| {
                matches!(e, IngestError::DigestMismatch(_))
            }),
            ("truncated", good[..good.len() / 2].to_vec(), |e| {
                matches!(e, IngestError::Truncated(_) | IngestError::NotDockerSave(_))
            }),
        ];
        for (what, bytes, ok) in cases {
            let (_d, s) = store();
            let err = ingest(&s, &bytes[..]).expect_err(what);
            assert!(ok(&err), "{what}: {err:?}");
            assert!(s.stored().is_empty(), "{what}: nothing stored, got {:?}", s.stored());
            let left = std::fs::read_dir(s.dir.join("tmp")).map(|r| r.count()).unwrap_or(0);
            assert_eq!(left, 0, "{what}: no temp file left");
        }
        let (_d, s) = store();
        let entries = ingest(&s, &good[..]).unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].reference, "app:1");
        assert_eq!(entries[0].layers[0].digest, format!("sha256:{}", sha(&layer)));
        assert!(s.has(&entries[0].layers[0].digest) && s.has(&entries[0].config_digest));
        // A gzipped archive reads the same.
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&good).unwrap();
        let (_d2, s2) = store();
        assert_eq!(ingest(&s2, &gz.finish().unwrap()[..]).unwrap(), entries);
    }

    #[test]
    fn a_reserve_larger_than_the_disk_refuses_with_no_space() {
        let layer = vec![7u8; 1 << 20];
        let dir = tempfile::tempdir().unwrap();
        let s = BlobStore::new(dir.path().join("blobs"), u64::MAX / 2);
        let err = ingest(&s, &archive(&layer, None)[..]).unwrap_err();
        assert!(matches!(err, IngestError::NoSpace { .. }), "{err:?}");
        assert_eq!(err.status().0, StatusCode::INSUFFICIENT_STORAGE);
    }
}
