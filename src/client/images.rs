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
                let body = match (file, from_docker) {
                    (_, Some(name)) => {
                        let docker = crate::worker::runtime::docker::DockerRuntime::connect().await?;
                        reqwest::Body::wrap_stream(docker.export_image(&name).map(|r| r.map_err(std::io::Error::other)))
                    }
                    (Some(p), None) if p.as_os_str() == "-" => {
                        reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(tokio::io::stdin()))
                    }
                    (Some(p), None) => {
                        let f =
                            tokio::fs::File::open(&p).await.with_context(|| format!("cannot open {}", p.display()))?;
                        let len = f.metadata().await?.len();
                        let stream = tokio_util::io::ReaderStream::with_capacity(f, 256 << 10);
                        return self
                            .call(
                                self.req(Method::POST, "/v1/images")
                                    .timeout(PUSH_TIMEOUT)
                                    .header(reqwest::header::CONTENT_TYPE, "application/x-tar")
                                    .header(reqwest::header::CONTENT_LENGTH, len)
                                    .body(reqwest::Body::wrap_stream(stream)),
                            )
                            .await;
                    }
                    (None, None) => bail!("name a file (or -) or pass --from-docker NAME:TAG"),
                };
                self.call(
                    self.req(Method::POST, "/v1/images")
                        .timeout(PUSH_TIMEOUT)
                        .header(reqwest::header::CONTENT_TYPE, "application/x-tar")
                        .body(body),
                )
                .await
            }
        }
    }
}
