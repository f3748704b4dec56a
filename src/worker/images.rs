//! Images without a registry, worker side (ARCHITECTURE.md "Images without a
//! registry"): an image the engine lacks but the managers' catalogue holds is fetched
//! from any manager over the cluster port (dial-out, this worker's certificate),
//! layer by layer, skipping layers the engine already has, resuming a cut download by
//! byte range (from the same or another manager), verifying every blob's digest, and
//! loaded through the engine as a streamed `docker load` archive.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::runtime::Runtime;
use crate::model::sync::{normalize_image_ref, CatalogueEntry};

/// Blobs downloaded at once for one image.
pub const FETCH_CONCURRENCY: usize = 2;
/// Longest wait for the next chunk of a blob before the download moves on to another
/// manager (resuming where it stopped).
pub const CHUNK_TIMEOUT: Duration = Duration::from_secs(30);
/// Attempts per blob across all managers before the fetch fails.
pub const ATTEMPTS: usize = 6;

/// Ids of the images the engine holds, refreshed now and then; sent in every sync.
#[derive(Default)]
pub struct HeldImages {
    ids: Mutex<(Option<Instant>, Vec<String>)>,
}

/// The held ids as last seen.
pub fn held_ids(h: &HeldImages) -> Vec<String> {
    crate::lock(&h.ids).1.clone()
}

/// Refreshes the held ids when older than `every` (or `force`).
pub async fn refresh_held(h: &HeldImages, runtime: &dyn Runtime, every: Duration, force: bool) {
    let stale = crate::lock(&h.ids).0.is_none_or(|t| t.elapsed() >= every);
    if !(stale || force) {
        return;
    }
    if let Ok(ids) = runtime.image_ids().await {
        *crate::lock(&h.ids) = (Some(Instant::now()), ids);
    }
}

/// Where and how a worker fetches.
#[derive(Clone)]
pub struct Fetcher {
    /// Mutual-TLS client (this worker's certificate).
    pub http: reqwest::Client,
    /// Manager cluster addresses, tried in turn.
    pub managers: Vec<String>,
    /// Download directory (`<worker data>/images`).
    pub dir: PathBuf,
    /// Bytes per second at most, across the blobs of one fetch.
    pub bandwidth: Option<u64>,
}

/// What a fetch did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fetched {
    /// Bytes downloaded (resumed parts count once).
    pub bytes: u64,
    /// Layers not fetched because the engine had them.
    pub skipped_layers: usize,
    /// Layers fetched.
    pub fetched_layers: usize,
}

/// Progress: bytes done and total of what must be fetched.
pub type Progress = Arc<dyn Fn(u64, u64) + Send + Sync>;

impl Fetcher {
    /// Looks the image up on the managers: `Ok(None)` when a manager answers that the
    /// catalogue lacks it, `Err` when none answers.
    pub async fn lookup(&self, reference: &str) -> Result<Option<CatalogueEntry>, String> {
        let reference = normalize_image_ref(reference);
        let mut last = String::from("no manager configured");
        for addr in &self.managers {
            let url = format!("https://{addr}/cluster/v1/images/entry");
            let call = self.http.get(&url).query(&[("reference", &reference)]).timeout(Duration::from_secs(10)).send();
            match call.await {
                Ok(r) if r.status() == reqwest::StatusCode::NOT_FOUND => return Ok(None),
                Ok(r) if r.status().is_success() => match r.json::<CatalogueEntry>().await {
                    Ok(e) => return Ok(Some(e)),
                    Err(e) => last = format!("{addr}: bad catalogue answer: {e}"),
                },
                Ok(r) => last = format!("{addr}: {}", r.status()),
                Err(e) => last = format!("{addr}: {e}"),
            }
        }
        Err(last)
    }

    /// Fetches the catalogued image `entry` and loads it into the engine.
    pub async fn fetch(
        &self,
        runtime: &dyn Runtime,
        entry: &CatalogueEntry,
        progress: Progress,
    ) -> Result<Fetched, String> {
        let chains = runtime.image_chains().await.map_err(|e| format!("cannot list the engine's layers: {e}"))?;
        let digests: Vec<&str> = entry.layers.iter().map(|l| l.digest.as_str()).collect();
        let skip = skippable(&chains, &digests);
        let mut wanted: Vec<(String, u64)> = entry.layers[skip..].iter().map(|l| (l.digest.clone(), l.size)).collect();
        wanted.push((entry.config_digest.clone(), entry.config_size));
        wanted.dedup_by(|a, b| a.0 == b.0);
        let total: u64 = wanted.iter().map(|w| w.1).sum();
        let done = Arc::new(AtomicU64::new(0));
        let pacer = Arc::new(Pacer::new(self.bandwidth));
        let blobs = self.dir.join("blobs");
        tokio::fs::create_dir_all(&blobs).await.map_err(|e| format!("{}: {e}", blobs.display()))?;
        progress(0, total);
        let results: Vec<Result<u64, String>> = futures::stream::iter(wanted.iter().cloned())
            .map(|(digest, size)| {
                let (done, pacer, progress, blobs) = (done.clone(), pacer.clone(), progress.clone(), blobs.clone());
                async move {
                    let on_bytes = |n: u64| {
                        let d = done.fetch_add(n, Ordering::Relaxed) + n;
                        progress(d, total);
                    };
                    self.download(&blobs, &digest, size, &pacer, &on_bytes).await
                }
            })
            .buffer_unordered(FETCH_CONCURRENCY)
            .collect()
            .await;
        let mut bytes = 0;
        for r in results {
            bytes += r?;
        }
        let archive = load_archive(&blobs, entry, skip);
        let loaded = runtime.load_image(archive).await;
        // The engine keeps the layers now; the downloads are not needed again.
        for (digest, _) in &wanted {
            let _ = tokio::fs::remove_file(blobs.join(&digest[7..])).await;
        }
        loaded.map_err(|e| format!("the engine refused the image: {e}"))?;
        Ok(Fetched { bytes, skipped_layers: skip, fetched_layers: entry.layers.len() - skip })
    }

    /// Downloads one blob into `<dir>/<hex>`, resuming a partial `<hex>.part`, trying
    /// managers in turn, then verifies its digest. Returns the bytes downloaded now.
    async fn download(
        &self,
        dir: &Path,
        digest: &str,
        size: u64,
        pacer: &Pacer,
        on_bytes: &(dyn Fn(u64) + Sync),
    ) -> Result<u64, String> {
        let hex = &digest[7..];
        let done_path = dir.join(hex);
        let part = dir.join(format!("{hex}.part"));
        let mut moved = 0u64;
        let mut last = String::new();
        for attempt in 0..ATTEMPTS.max(self.managers.len()) {
            let addr = &self.managers[attempt % self.managers.len().max(1)];
            let have = tokio::fs::metadata(&part).await.map(|m| m.len()).unwrap_or(0);
            if have > 0 && attempt == 0 {
                on_bytes(have);
            }
            if have >= size {
                break;
            }
            match self.get_range(addr, digest, &part, have, pacer, on_bytes).await {
                Ok(n) => {
                    moved += n;
                    break;
                }
                Err((n, e)) => {
                    moved += n;
                    last = format!("{addr}: {e}");
                    tracing::info!(%digest, %addr, error = %e, "blob download cut; resuming from the next manager");
                    tokio::time::sleep(Duration::from_millis(200 * (attempt as u64 + 1))).await;
                }
            }
        }
        let len = tokio::fs::metadata(&part).await.map(|m| m.len()).unwrap_or(0);
        if len != size {
            return Err(format!("could not fetch blob {digest} ({len} of {size} bytes): {last}"));
        }
        let p = part.clone();
        let got = tokio::task::spawn_blocking(move || -> std::io::Result<String> {
            let mut f = std::fs::File::open(p)?;
            let mut h = Sha256::new();
            std::io::copy(&mut f, &mut h)?;
            Ok(hex::encode(h.finalize()))
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        if got != hex {
            let _ = tokio::fs::remove_file(&part).await;
            return Err(format!("blob {digest} failed verification: it hashes to sha256:{got}"));
        }
        tokio::fs::rename(&part, &done_path).await.map_err(|e| e.to_string())?;
        Ok(moved)
    }

    /// Appends `digest` from byte `from` to `part`; `Err((bytes moved, why))` on a cut.
    async fn get_range(
        &self,
        addr: &str,
        digest: &str,
        part: &Path,
        from: u64,
        pacer: &Pacer,
        on_bytes: &(dyn Fn(u64) + Sync),
    ) -> Result<u64, (u64, String)> {
        let url = format!("https://{addr}/cluster/v1/blobs/{digest}");
        let mut req = self.http.get(&url);
        if from > 0 {
            req = req.header(reqwest::header::RANGE, format!("bytes={from}-"));
        }
        let mut resp = tokio::time::timeout(CHUNK_TIMEOUT, req.send())
            .await
            .map_err(|_| (0, "no answer".to_string()))?
            .map_err(|e| (0, e.to_string()))?;
        let status = resp.status();
        let append = status == reqwest::StatusCode::PARTIAL_CONTENT;
        if !status.is_success() {
            return Err((0, format!("{status}")));
        }
        let mut file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(append)
            .write(true)
            .truncate(!append)
            .open(part)
            .await
            .map_err(|e| (0, e.to_string()))?;
        let mut moved = 0u64;
        loop {
            let chunk = match tokio::time::timeout(CHUNK_TIMEOUT, resp.chunk()).await {
                Err(_) => return Err((moved, format!("no data for {CHUNK_TIMEOUT:?}"))),
                Ok(Err(e)) => return Err((moved, e.to_string())),
                Ok(Ok(None)) => break,
                Ok(Ok(Some(c))) => c,
            };
            file.write_all(&chunk).await.map_err(|e| (moved, e.to_string()))?;
            moved += chunk.len() as u64;
            on_bytes(chunk.len() as u64);
            pacer.pace(chunk.len() as u64).await;
        }
        file.flush().await.map_err(|e| (moved, e.to_string()))?;
        Ok(moved)
    }
}

/// How many bottom layers of `wanted` the engine holds already: the longest prefix
/// shared with any local image's chain (a layer is reused only with the same layers
/// below it, as `docker load` checks by chain id).
pub fn skippable(chains: &[Vec<String>], wanted: &[&str]) -> usize {
    chains.iter().map(|c| c.iter().zip(wanted).take_while(|(a, b)| a.as_str() == **b).count()).max().unwrap_or(0)
}

/// Keeps a fetch under its byte rate by sleeping after chunks that run ahead.
struct Pacer {
    rate: Option<u64>,
    start: Instant,
    bytes: AtomicU64,
}

impl Pacer {
    fn new(rate: Option<u64>) -> Self {
        Pacer { rate, start: Instant::now(), bytes: AtomicU64::new(0) }
    }

    async fn pace(&self, n: u64) {
        let Some(rate) = self.rate.filter(|r| *r > 0) else { return };
        let total = self.bytes.fetch_add(n, Ordering::Relaxed) + n;
        let due = Duration::from_secs_f64(total as f64 / rate as f64);
        let elapsed = self.start.elapsed();
        if due > elapsed {
            tokio::time::sleep(due - elapsed).await;
        }
    }
}

/// The `docker load` archive for `entry`, streamed: its config, the layers from
/// `skip` on (read from `dir`), and a manifest naming every layer; `docker load` does
/// not open the files of layers whose chain the engine already has.
fn load_archive(dir: &Path, entry: &CatalogueEntry, skip: usize) -> super::runtime::LoadStream {
    let (reader, writer) = tokio::io::duplex(256 << 10);
    let (dir, entry) = (dir.to_path_buf(), entry.clone());
    let writer = tokio_util::io::SyncIoBridge::new(writer);
    tokio::task::spawn_blocking(move || {
        if let Err(e) = write_archive(writer, &dir, &entry, skip) {
            // The stream ends early; the engine refuses the short archive and the
            // fetch reports that.
            tracing::warn!(error = %e, "could not assemble the image archive");
        }
    });
    Box::pin(tokio_util::io::ReaderStream::new(reader).filter_map(|r| async move { r.ok() }))
}

fn write_archive(out: impl std::io::Write, dir: &Path, entry: &CatalogueEntry, skip: usize) -> std::io::Result<()> {
    let mut b = tar::Builder::new(out);
    let cfg_hex = &entry.config_digest[7..];
    let layers: Vec<String> = entry.layers.iter().map(|l| format!("{}/layer.tar", &l.digest[7..])).collect();
    let manifest = serde_json::to_vec(&serde_json::json!([{
        "Config": format!("{cfg_hex}.json"),
        "RepoTags": [entry.reference],
        "Layers": layers,
    }]))?;
    let mut append = |name: &str, size: u64, data: &mut dyn std::io::Read| {
        let mut h = tar::Header::new_gnu();
        h.set_size(size);
        h.set_mode(0o644);
        h.set_mtime(0);
        h.set_cksum();
        b.append_data(&mut h, name, data)
    };
    append("manifest.json", manifest.len() as u64, &mut &manifest[..])?;
    let cfg = std::fs::File::open(dir.join(cfg_hex))?;
    append(&format!("{cfg_hex}.json"), cfg.metadata()?.len(), &mut &cfg)?;
    for (l, name) in entry.layers.iter().zip(&layers).skip(skip) {
        let f = std::fs::File::open(dir.join(&l.digest[7..]))?;
        append(name, f.metadata()?.len(), &mut &f)?;
    }
    b.into_inner()?.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_shared_bottom_chain_is_skipped() {
        let c = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let chains = vec![c(&["a", "b", "x"]), c(&["a"]), c(&["b", "c"])];
        let check = |wanted: &[&str], expect: usize| assert_eq!(skippable(&chains, wanted), expect, "{wanted:?}");
        check(&["a", "b", "c"], 2);
        check(&["a", "c"], 1);
        check(&["c"], 0);
        check(&["b", "c", "d"], 2);
        assert_eq!(skippable(&[], &["a"]), 0);
    }
}
