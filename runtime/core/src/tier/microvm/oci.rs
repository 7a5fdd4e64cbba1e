//! Image uploads as the microvm tier reads them, told apart by their content (after
//! decompression, gzip or zstd, by magic bytes):
//!
//! - an **OCI image layout**, tarred: `oci-layout`, `index.json` and `blobs/sha256/<hex>` at its
//!   top (what `docker save` writes since Docker 25, `skopeo copy … oci-archive:`, `buildah push`);
//! - a **`docker save` archive**: `manifest.json` at its top (`[{"Config", "Layers"}]`), the
//!   layers as `<id>/layer.tar` or `blobs/sha256/<hex>`;
//! - otherwise a **root filesystem tar**: the archive is the root, one layer.
//!
//! Every blob reached through a digest is checked against it (SHA-256 only) before it is used:
//! a missing blob or a mismatch is refused, so what boots is exactly what the manifest names. A
//! `docker save` layer named by a directory rather than a digest is checked against the image
//! config's `rootfs.diff_ids` when it is an uncompressed tar (the digest those name). The JSON
//! documents are read with `oci-spec`'s types.

use std::collections::HashMap;
use std::io::Read;

use oci_spec::image::{Descriptor, DigestAlgorithm, ImageConfiguration, ImageIndex, ImageManifest, MediaType};
use serde::Deserialize;

use super::rootfs::{self, Budget, Compression, Limits, Unpacker};
use crate::digest::Digest;
use kiln_vmm::initramfs::Tree;

/// What an image's config says about running it (all optional), from an OCI image config.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ImageDefaults {
    pub entrypoint: Option<Vec<String>>,
    pub cmd: Option<Vec<String>>,
    pub env: Vec<String>,
    pub workdir: Option<String>,
    pub user: Option<String>,
}

/// An unpacked upload.
#[derive(Debug)]
pub struct Unpacked {
    pub tree: Tree,
    /// The image config's run settings; `None` for a root filesystem tar.
    pub defaults: Option<ImageDefaults>,
}

/// Unpacks an image upload (its first bytes say it is an archive: see [`is_archive`]).
pub fn unpack(upload: &[u8], limits: Limits) -> Result<Unpacked, String> {
    let budget = Budget::new(limits);
    let what = format!("the uploaded {}", Compression::of(upload).name());
    let head = rootfs::head(upload, 512, &budget)?;
    if !rootfs::is_tar(&head) {
        return Err(format!(
            "{what} is not a tar archive: the microvm tier runs a static x86_64 Linux executable, \
             a root filesystem tar or an OCI image"
        ));
    }
    let names = top_names(upload, &budget, &what)?;
    if names.iter().any(|n| n == "oci-layout") && names.iter().any(|n| n == "index.json") {
        let files = Files::read(upload, &budget, &what)?;
        oci_layout(&files, &budget)
    } else if names.iter().any(|n| n == "manifest.json") {
        let files = Files::read(upload, &budget, &what)?;
        docker_archive(&files, &budget)
    } else {
        let mut unpacker = Unpacker::new(&budget);
        unpacker.layer(upload, "the root filesystem tar")?;
        Ok(Unpacked {
            tree: unpacker.finish()?,
            defaults: None,
        })
    }
}

/// Whether an upload's first bytes are those of an archive (gzip, zstd, or a tar header): the
/// image path, rather than the static executable one.
pub fn is_archive(upload: &[u8]) -> bool {
    Compression::of(upload) != Compression::None || rootfs::is_tar(upload)
}

/// The names of the archive's top-level files (a first pass that reads no content into memory).
fn top_names(upload: &[u8], budget: &Budget, what: &str) -> Result<Vec<String>, String> {
    let mut archive = tar::Archive::new(rootfs::open(upload, budget)?);
    let mut names = Vec::new();
    for (count, entry) in archive.entries().map_err(|e| budget.error(what, e))?.enumerate() {
        let entry = entry.map_err(|e| budget.error(what, e))?;
        if count >= budget.limits().max_entries {
            return Err(format!(
                "the image has more than {} entries",
                budget.limits().max_entries
            ));
        }
        if let Some(path) = rootfs::normalize(&entry.path_bytes())? {
            if !path.contains('/') && entry.header().entry_type().is_file() {
                names.push(path);
            }
        }
    }
    Ok(names)
}

/// The regular files and symlinks of an archive (an image layout or a `docker save`), in memory.
struct Files {
    files: HashMap<String, Vec<u8>>,
    symlinks: HashMap<String, String>,
}

impl Files {
    fn read(upload: &[u8], budget: &Budget, what: &str) -> Result<Files, String> {
        let mut archive = tar::Archive::new(rootfs::open(upload, budget)?);
        let (mut files, mut symlinks) = (HashMap::new(), HashMap::new());
        for entry in archive.entries().map_err(|e| budget.error(what, e))? {
            let mut entry = entry.map_err(|e| budget.error(what, e))?;
            let Some(path) = rootfs::normalize(&entry.path_bytes())? else {
                continue;
            };
            match entry.header().entry_type() {
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    let mut data = Vec::with_capacity(entry.size() as usize);
                    entry.read_to_end(&mut data).map_err(|e| budget.error(what, e))?;
                    files.insert(path, data);
                }
                tar::EntryType::Symlink | tar::EntryType::Link => {
                    let target = entry.link_name_bytes().unwrap_or_default().into_owned();
                    let target = String::from_utf8_lossy(&target).into_owned();
                    symlinks.insert(path, target);
                }
                _ => {}
            }
        }
        Ok(Files { files, symlinks })
    }

    /// The file at `path`, following the archive's own links (`docker save` links repeated
    /// layers) a few hops, never out of the archive.
    fn get(&self, path: &str) -> Option<&[u8]> {
        let mut path = rootfs::normalize(path.as_bytes()).ok()??;
        for _ in 0..8 {
            if let Some(data) = self.files.get(&path) {
                return Some(data);
            }
            let target = self.symlinks.get(&path)?;
            let base = match path.rsplit_once('/') {
                Some((dir, _)) if !target.starts_with('/') => format!("{dir}/{target}"),
                _ => target.clone(),
            };
            path = rootfs::normalize(base.as_bytes()).ok()??;
        }
        None
    }

    /// The blob a descriptor names, checked against its digest and size.
    fn blob(&self, descriptor: &Descriptor, what: &str) -> Result<&[u8], String> {
        let digest = descriptor.digest();
        if *digest.algorithm() != DigestAlgorithm::Sha256 {
            return Err(format!(
                "the image's {what} has the digest {digest}: Kiln checks sha256 digests only"
            ));
        }
        let hex = digest.digest();
        let data = self
            .get(&format!("blobs/sha256/{hex}"))
            .ok_or_else(|| format!("the image's {what} blob sha256:{hex} is missing from the archive"))?;
        check_digest(data, hex, what)?;
        if data.len() as u64 != descriptor.size() {
            return Err(format!(
                "the image's {what} blob sha256:{hex} is {} bytes, but its descriptor says {}",
                data.len(),
                descriptor.size()
            ));
        }
        Ok(data)
    }
}

fn check_digest(data: &[u8], hex: &str, what: &str) -> Result<(), String> {
    let actual = Digest::of(data);
    if !actual.hex().eq_ignore_ascii_case(hex) {
        return Err(format!(
            "the image's {what} blob does not match its digest sha256:{hex} (its content hashes to \
             sha256:{}): the archive is corrupt or was altered",
            actual.hex()
        ));
    }
    Ok(())
}

fn oci_layout(files: &Files, budget: &Budget) -> Result<Unpacked, String> {
    let json = |path: &str| files.get(path).ok_or_else(|| format!("the image layout has no {path}"));
    oci_spec::image::OciLayout::from_reader(json("oci-layout")?)
        .map_err(|e| format!("the image layout's oci-layout is not valid: {e}"))?;
    let index = ImageIndex::from_reader(json("index.json")?)
        .map_err(|e| format!("the image layout's index.json is not valid: {e}"))?;
    let descriptor = choose_manifest(files, &index, 0)?;
    let manifest = ImageManifest::from_reader(files.blob(&descriptor, "manifest")?)
        .map_err(|e| format!("the image manifest is not valid: {e}"))?;
    let config = ImageConfiguration::from_reader(files.blob(manifest.config(), "config")?)
        .map_err(|e| format!("the image config is not valid: {e}"))?;
    let mut unpacker = Unpacker::new(budget);
    for (i, layer) in manifest.layers().iter().enumerate() {
        let what = format!("layer {}", i + 1);
        let data = files.blob(layer, &what)?;
        unpacker.layer(data, &format!("{what} (sha256:{})", layer.digest().digest()))?;
    }
    Ok(Unpacked {
        tree: unpacker.finish()?,
        defaults: Some(defaults(&config)),
    })
}

/// The manifest to run from an index: the only one, or the one for linux/amd64 (following a
/// nested index, as multi-platform images have).
fn choose_manifest(files: &Files, index: &ImageIndex, depth: usize) -> Result<Descriptor, String> {
    use oci_spec::image::{Arch, Os};
    let runs_here = |d: &Descriptor| {
        d.platform()
            .as_ref()
            .is_none_or(|p| *p.os() == Os::Linux && *p.architecture() == Arch::Amd64)
    };
    let candidates: Vec<&Descriptor> = index.manifests().iter().filter(|d| runs_here(d)).collect();
    let Some(descriptor) = candidates.first() else {
        return Err(if index.manifests().is_empty() {
            "the image index lists no manifest".into()
        } else {
            "the image has no linux/amd64 manifest: the microvm tier runs x86_64 Linux".into()
        });
    };
    let is_index = matches!(descriptor.media_type(), MediaType::ImageIndex)
        || descriptor.media_type().to_string() == "application/vnd.docker.distribution.manifest.list.v2+json";
    if !is_index {
        return Ok((*descriptor).clone());
    }
    if depth >= 4 {
        return Err("the image's indexes nest too deep".into());
    }
    let nested = ImageIndex::from_reader(files.blob(descriptor, "index")?)
        .map_err(|e| format!("the image's nested index is not valid: {e}"))?;
    choose_manifest(files, &nested, depth + 1)
}

/// One image of a `docker save` archive's `manifest.json`.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerImage {
    config: String,
    layers: Vec<String>,
}

fn docker_archive(files: &Files, budget: &Budget) -> Result<Unpacked, String> {
    let manifest = files
        .get("manifest.json")
        .ok_or("the docker archive has no manifest.json")?;
    let images: Vec<DockerImage> = serde_json::from_slice(manifest)
        .map_err(|e| format!("the docker archive's manifest.json is not valid (it needs Config and Layers): {e}"))?;
    let image = match images.as_slice() {
        [image] => image,
        [] => return Err("the docker archive's manifest.json lists no image".into()),
        more => {
            return Err(format!(
                "the docker archive holds {} images; save one image per deploy",
                more.len()
            ))
        }
    };
    let named = |path: &str, what: &str| -> Result<&[u8], String> {
        let data = files
            .get(path)
            .ok_or_else(|| format!("the docker archive's {what} {path} is missing from the archive"))?;
        // Content-addressed names are checked against their digest.
        let file = path.rsplit('/').next().unwrap_or(path);
        let hex = file.strip_suffix(".json").unwrap_or(file);
        if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            check_digest(data, hex, what)?;
        }
        Ok(data)
    };
    let config = ImageConfiguration::from_reader(named(&image.config, "config")?)
        .map_err(|e| format!("the image config is not valid: {e}"))?;
    let diff_ids = config.rootfs().diff_ids();
    let mut unpacker = Unpacker::new(budget);
    for (i, path) in image.layers.iter().enumerate() {
        let what = format!("layer {}", i + 1);
        let data = named(path, &what)?;
        if let (Compression::None, Some(diff_id)) = (Compression::of(data), diff_ids.get(i)) {
            if let Some(hex) = diff_id.strip_prefix("sha256:") {
                check_digest(data, hex, &what)?;
            }
        }
        unpacker.layer(data, &format!("{what} ({path})"))?;
    }
    Ok(Unpacked {
        tree: unpacker.finish()?,
        defaults: Some(defaults(&config)),
    })
}

fn defaults(config: &ImageConfiguration) -> ImageDefaults {
    let Some(c) = config.config() else {
        return ImageDefaults::default();
    };
    ImageDefaults {
        entrypoint: c.entrypoint().clone(),
        cmd: c.cmd().clone(),
        env: c.env().clone().unwrap_or_default(),
        workdir: c.working_dir().clone().filter(|w| !w.is_empty()),
        user: c.user().clone().filter(|u| !u.is_empty()),
    }
}

#[cfg(test)]
mod tests {
    use super::super::rootfs::tests::{tar, T};
    use super::*;
    use serde_json::json;

    fn limits() -> Limits {
        Limits::for_memory_mb(128)
    }

    fn sha(data: &[u8]) -> String {
        Digest::of(data).hex().to_owned()
    }

    /// A tarred OCI layout of `layers` with `config`; `mangle` may change the blobs first.
    fn layout(
        layers: &[Vec<u8>],
        config: serde_json::Value,
        mangle: impl FnOnce(&mut Vec<(String, Vec<u8>)>),
    ) -> Vec<u8> {
        let config = serde_json::to_vec(&config).unwrap();
        let descriptor = |media: &str, data: &[u8]| json!({"mediaType": media, "digest": format!("sha256:{}", sha(data)), "size": data.len()});
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": descriptor("application/vnd.oci.image.config.v1+json", &config),
            "layers": layers.iter().map(|l| descriptor("application/vnd.oci.image.layer.v1.tar", l)).collect::<Vec<_>>(),
        }))
        .unwrap();
        let index = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "manifests": [descriptor("application/vnd.oci.image.manifest.v1+json", &manifest)],
        }))
        .unwrap();
        let mut blobs: Vec<(String, Vec<u8>)> = std::iter::once(config)
            .chain(std::iter::once(manifest))
            .chain(layers.iter().cloned())
            .map(|b| (format!("blobs/sha256/{}", sha(&b)), b))
            .collect();
        mangle(&mut blobs);
        let mut entries = vec![
            (
                String::from("oci-layout"),
                br#"{"imageLayoutVersion": "1.0.0"}"#.to_vec(),
            ),
            ("index.json".into(), index),
        ];
        entries.extend(blobs);
        let entries: Vec<T> = entries.iter().map(|(p, d)| T::File(p, d)).collect();
        tar(&entries)
    }

    fn image_config(config: serde_json::Value) -> serde_json::Value {
        json!({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}, "config": config})
    }

    #[test]
    fn an_oci_layout_image_unpacks_its_layers_and_keeps_its_config() {
        let base = tar(&[T::File("bin/tool", b"v1"), T::File("etc/old", b"old")]);
        let top = tar(&[T::File("bin/tool", b"v2"), T::File("etc/.wh.old", b"")]);
        let config = image_config(
            json!({"Entrypoint": ["/bin/tool"], "Cmd": ["--serve"], "Env": ["A=1"], "WorkingDir": "/srv", "User": "1000:1000"}),
        );
        let upload = layout(&[base, top], config, |_| {});
        let unpacked = unpack(&upload, limits()).unwrap();
        assert!(matches!(unpacked.tree.get("bin/tool"), Some(kiln_vmm::initramfs::Node::File(f)) if f.data == b"v2"));
        assert!(!unpacked.tree.contains_key("etc/old"));
        let defaults = unpacked.defaults.unwrap();
        assert_eq!(defaults.entrypoint.unwrap(), ["/bin/tool"]);
        assert_eq!(defaults.cmd.unwrap(), ["--serve"]);
        assert_eq!(
            (defaults.env, defaults.workdir, defaults.user),
            (
                vec!["A=1".to_owned()],
                Some("/srv".to_owned()),
                Some("1000:1000".to_owned())
            )
        );

        // The same layout gzip-compressed as a whole is the same image.
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &upload).unwrap();
        assert!(unpack(&gz.finish().unwrap(), limits()).is_ok());
    }

    #[test]
    fn image_blobs_are_checked_against_their_digests() {
        let layer = tar(&[T::File("f", b"content")]);
        let config = image_config(json!({"Cmd": ["/f"]}));
        let layer_path = format!("blobs/sha256/{}", sha(&layer));
        let missing = layout(std::slice::from_ref(&layer), config.clone(), |blobs| {
            blobs.retain(|(p, _)| *p != layer_path)
        });
        let err = unpack(&missing, limits()).unwrap_err();
        assert!(err.contains("layer 1 blob") && err.contains("missing"), "{err}");
        let altered = layout(std::slice::from_ref(&layer), config, |blobs| {
            for (p, data) in blobs.iter_mut() {
                if *p == layer_path {
                    let at = data.iter().position(|b| *b == b'c').unwrap();
                    data[at] = b'C'; // the file's content, not its header: still a valid tar
                }
            }
        });
        let err = unpack(&altered, limits()).unwrap_err();
        assert!(err.contains("does not match its digest"), "{err}");
    }

    #[test]
    fn a_docker_save_archive_is_an_image_too() {
        let layer = tar(&[T::File("bin/app", b"app")]);
        let config = serde_json::to_vec(&json!({
            "architecture": "amd64", "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{}", sha(&layer))]},
            "config": {"Cmd": ["/bin/app"]},
        }))
        .unwrap();
        let config_name = format!("{}.json", sha(&config));
        let manifest =
            serde_json::to_vec(&json!([{"Config": config_name, "RepoTags": ["app:1"], "Layers": ["abc/layer.tar"]}]))
                .unwrap();
        let upload = tar(&[
            T::File("manifest.json", &manifest),
            T::File(&config_name, &config),
            T::File("abc/layer.tar", &layer),
        ]);
        let unpacked = unpack(&upload, limits()).unwrap();
        assert_eq!(unpacked.defaults.unwrap().cmd.unwrap(), ["/bin/app"]);
        assert!(unpacked.tree.contains_key("bin/app"));
        // A layer that is not the one the config's diff_ids name is refused.
        let other = tar(&[T::File("bin/app", b"evil")]);
        let upload = tar(&[
            T::File("manifest.json", &manifest),
            T::File(&config_name, &config),
            T::File("abc/layer.tar", &other),
        ]);
        let err = unpack(&upload, limits()).unwrap_err();
        assert!(
            err.contains("layer 1") && err.contains("does not match its digest"),
            "{err}"
        );
    }
}
