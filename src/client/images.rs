//! `holdfast image push|list|rm`: the managers' image catalogue from the CLI. A push
//! streams the archive (a file, stdin, or `docker save` from the local engine) as
//! the request body; nothing holds the whole image in memory.

use std::time::Duration;

use anyhow::{bail, Context};
use futures::StreamExt;

use super::Api;
use crate::cli::ImageCommand;

/// Longest a whole push may take (a large image over a thin link).
const PUSH_TIMEOUT: Duration = Duration::from_secs(6 * 3600);

impl Api {
    /// Runs a `holdfast image ...` command against the API.
    pub async fn image(&self, cmd: ImageCommand) -> anyhow::Result<()> {
        use reqwest::Method;
        match cmd {
            ImageCommand::Echo => bail!("`holdfast image echo` builds locally; it is not an API call"),
            ImageCommand::List => self.call(self.req(Method::GET, "/v1/images")).await,
            ImageCommand::Rm { reference, force } => {
                let path = format!("/v1/images/{reference}{}", if force { "?force=true" } else { "" });
                self.call(self.req(Method::DELETE, &path)).await
            }
            ImageCommand::Push { file, from_docker } => {
                let source: Box<dyn futures::Stream<Item = std::io::Result<bytes::Bytes>> + Send + Unpin> =
                    match (file, from_docker) {
                        (_, Some(name)) => {
                            let docker = crate::worker::runtime::docker::DockerRuntime::connect().await?;
                            Box::new(Box::pin(docker.export_image(&name).map(|r| r.map_err(std::io::Error::other))))
                        }
                        (Some(p), None) if p.as_os_str() == "-" => {
                            Box::new(tokio_util::io::ReaderStream::new(tokio::io::stdin()))
                        }
                        (Some(p), None) => {
                            let f = tokio::fs::File::open(&p)
                                .await
                                .with_context(|| format!("cannot open {}", p.display()))?;
                            Box::new(tokio_util::io::ReaderStream::with_capacity(f, 256 << 10))
                        }
                        (None, None) => bail!("name a file (or -) or pass --from-docker NAME:TAG"),
                    };
                let body = self.without_known_layers(source);
                self.call(
                    self.req(Method::POST, "/v1/images")
                        .timeout(PUSH_TIMEOUT)
                        .header(reqwest::header::CONTENT_TYPE, "application/x-tar")
                        .body(reqwest::Body::wrap_stream(body)),
                )
                .await
            }
        }
    }
}

/// Layer files smaller than this are sent without asking whether the managers hold them.
const ASK_ABOVE: u64 = 64 << 10;

impl Api {
    /// Re-streams a `docker save` archive, leaving out the layer files the manager
    /// already holds (asked by digest, `GET /v1/images?have=`), so a new version whose
    /// only change is its top layer sends only that layer. Each layer passes through a
    /// temporary file while it is hashed; the rest streams through.
    fn without_known_layers(
        &self,
        source: impl futures::Stream<Item = std::io::Result<bytes::Bytes>> + Send + Unpin + 'static,
    ) -> impl futures::Stream<Item = std::io::Result<bytes::Bytes>> + Send + 'static {
        let (reader, writer) = tokio::io::duplex(256 << 10);
        let input = tokio_util::io::SyncIoBridge::new(tokio_util::io::StreamReader::new(source));
        let output = tokio_util::io::SyncIoBridge::new(writer);
        let (http, url, token) = (self.http.clone(), format!("{}/v1/images", self.base), self.token.clone());
        let handle = tokio::runtime::Handle::current();
        let (err_tx, err_rx) = tokio::sync::oneshot::channel::<std::io::Error>();
        tokio::task::spawn_blocking(move || {
            let held = |digest: &str| -> bool {
                let call =
                    http.get(&url).query(&[("have", digest)]).bearer_auth(&token).timeout(Duration::from_secs(30));
                handle
                    .block_on(async { call.send().await.ok()?.json::<serde_json::Value>().await.ok() })
                    .is_some_and(|v| v["have"].as_array().is_some_and(|a| a.iter().any(|d| d == digest)))
            };
            if let Err(e) = filter_archive(input, output, held) {
                let _ = err_tx.send(e);
            }
        });
        // An error while filtering ends the body with it, so the upload fails loudly.
        let tail = futures::stream::once(async move {
            match err_rx.await {
                Ok(e) => Some(Err(e)),
                Err(_) => None,
            }
        })
        .filter_map(|x| async move { x });
        tokio_util::io::ReaderStream::new(reader).chain(tail)
    }
}

fn filter_archive(
    input: impl std::io::Read,
    output: impl std::io::Write,
    held: impl Fn(&str) -> bool,
) -> std::io::Result<()> {
    use sha2::Digest;
    let mut archive = tar::Archive::new(input);
    let mut out = tar::Builder::new(output);
    for entry in archive.entries()? {
        let mut entry = entry?;
        let mut header = entry.header().clone();
        let path = entry.path()?.to_path_buf();
        let name = path.to_string_lossy().to_string();
        let layer = entry.header().entry_type().is_file()
            && entry.size() > ASK_ABOVE
            && (name.ends_with("/layer.tar") || name.starts_with("blobs/sha256/"));
        if !layer {
            if let Some(link) = entry.link_name()? {
                let link = link.to_path_buf();
                out.append_link(&mut header, &path, &link)?;
            } else {
                out.append_data(&mut header, &path, &mut entry)?;
            }
            continue;
        }
        // Unlinked at once: the file lives as long as the handle, even after a crash.
        let tmp_path = std::env::temp_dir().join(format!("holdfast-push-{}", uuid::Uuid::new_v4().simple()));
        let mut tmp = std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(&tmp_path)?;
        std::fs::remove_file(&tmp_path)?;
        let mut hash = sha2::Sha256::new();
        let mut buf = vec![0u8; 256 << 10];
        loop {
            let n = std::io::Read::read(&mut entry, &mut buf)?;
            if n == 0 {
                break;
            }
            hash.update(&buf[..n]);
            std::io::Write::write_all(&mut tmp, &buf[..n])?;
        }
        let digest = format!("sha256:{}", hex::encode(hash.finalize()));
        if held(&digest) {
            continue;
        }
        std::io::Seek::seek(&mut tmp, std::io::SeekFrom::Start(0))?;
        out.append_data(&mut header, &path, &mut tmp)?;
    }
    std::io::Write::flush(&mut out.into_inner()?)
}
