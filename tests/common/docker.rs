//! Docker CLI helpers for tests and benches that build and load images on the real
//! engine (the benches include this file with `#[path]`). Self-contained: std and
//! `tar` only.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

/// Runs the docker CLI; its trimmed stdout, or a panic with its stderr on failure.
pub fn docker(args: &[&str]) -> String {
    let out = Command::new("docker").args(args).output().expect("docker CLI");
    assert!(out.status.success(), "docker {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Image tags a test made; removed from the engine when it ends, passed or failed.
pub struct RemoveImages(pub Vec<String>);

impl Drop for RemoveImages {
    fn drop(&mut self) {
        for tag in &self.0 {
            let _ = Command::new("docker").args(["rmi", "-f", tag]).output();
        }
    }
}

/// Builds `tag` FROM `from`, copying in the files given (name, content, mode 0755) in
/// a context of its own under `dir`; an image FROM scratch gets `/holdfast` as its
/// entrypoint.
pub fn build_image(dir: &Path, tag: &str, from: &str, files: &[(&str, &[u8])]) {
    use std::os::unix::fs::PermissionsExt;
    let ctx = dir.join(format!("ctx-{}", tag.replace([':', '/'], "_")));
    std::fs::create_dir_all(&ctx).expect("build context");
    let mut dockerfile = format!("FROM {from}\n");
    for (name, data) in files {
        std::fs::write(ctx.join(name), data).expect("context file");
        std::fs::set_permissions(ctx.join(name), std::fs::Permissions::from_mode(0o755)).expect("mode");
        dockerfile.push_str(&format!("COPY {name} /{name}\n"));
    }
    if from == "scratch" {
        dockerfile.push_str("ENTRYPOINT [\"/holdfast\"]\n");
    }
    std::fs::write(ctx.join("Dockerfile"), dockerfile).expect("Dockerfile");
    docker(&["build", "-q", "-t", tag, ctx.to_str().expect("utf-8 path")]);
}

/// A tar archive in memory of the files given (name, content), each with `mode`.
pub fn tar_of(files: &[(&str, &[u8])], mode: u32) -> Vec<u8> {
    let mut archive = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(mode);
        header.set_cksum();
        archive.append_data(&mut header, name, *data).expect("tar entry");
    }
    archive.into_inner().expect("tar archive")
}
