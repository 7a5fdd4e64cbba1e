//! [`S3Blobs`]: blobs in an S3 bucket (`--blob-store s3://BUCKET?endpoint=…&region=…`), which
//! every node of a shared database reads and writes, with each node's data directory as its
//! cache.
//!
//! - Keys are `<kind>/<hex>`, the kind's prefix being LocalBlobs' directory name: `artifacts/`,
//!   `results/`, `sandboxes/`, `sandboxes/chunks/`.
//! - `put` returns once the store acknowledged the object (S3 writes are durable when
//!   acknowledged): a deploy commits its version only after that. It always uploads: the bytes
//!   are the digest's, so writing them again is harmless and repairs a damaged object.
//! - `get` and `open` read through `<data>/blob-cache/<kind>/<hex>`: a download goes to a temp
//!   file, is checked against its digest (SHA-256) and synced, and only then renamed into place,
//!   so a store that returns the wrong bytes is refused, naming the digest, and nothing of them
//!   is kept. Sandbox chunks are named within their function, so this layer cannot check them;
//!   they are not cached, and their reader checks them (`sandboxes::saved`).
//! - Timeouts and retries are object_store's defaults: 5 s to connect, 30 s per request, up to
//!   10 retries of connection errors, 5xx and 429 answers within 3 minutes (backoff from 100 ms
//!   to 15 s). The start-up check retries twice only, so a wrong endpoint fails `kiln serve` in
//!   seconds.
//!
//! The [`Blobs`] trait is blocking and is called from tokio workers and plain threads alike, so
//! the requests run on a small runtime of this store's own and the caller waits on a channel:
//! `Runtime::block_on` would panic inside another runtime.

use std::fs::{self, File};
use std::future::Future;
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::path::Path as Key;
use object_store::{BackoffConfig, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig};
use sha2::{Digest as _, Sha256};

use super::local::Layout;
use super::{BlobKind, Blobs};
use crate::digest::Digest;

/// Where the bucket is: what `s3://BUCKET?endpoint=URL&region=NAME` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Location {
    pub bucket: String,
    /// An S3-compatible server (`http://` allowed since it was asked for), addressed path-style;
    /// `None` is AWS itself.
    pub endpoint: Option<String>,
    pub region: String,
}

impl S3Location {
    /// Parses `s3://BUCKET[?endpoint=URL][&region=NAME]`; the region defaults to `us-east-1`.
    pub fn parse(url: &str) -> Result<S3Location, String> {
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| format!("{url}: not an s3:// URL"))?;
        let (bucket, query) = rest.split_once('?').unwrap_or((rest, ""));
        let bucket = bucket.strip_suffix('/').unwrap_or(bucket);
        let valid = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        if !valid {
            return Err(format!(
                "{url}: `{bucket}` is not a bucket name (3 to 63 of a-z, 0-9, `-` and `.`; no path after it)"
            ));
        }
        let mut location = S3Location {
            bucket: bucket.to_owned(),
            endpoint: None,
            region: "us-east-1".to_owned(),
        };
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            match &*key {
                "endpoint" => {
                    if !(value.starts_with("http://") || value.starts_with("https://")) {
                        return Err(format!("{url}: endpoint `{value}` must be an http:// or https:// URL"));
                    }
                    location.endpoint = Some(value.trim_end_matches('/').to_owned());
                }
                "region" if !value.is_empty() => location.region = value.into_owned(),
                "region" => return Err(format!("{url}: region is empty")),
                other => return Err(format!("{url}: unknown parameter `{other}` (known: endpoint, region)")),
            }
        }
        Ok(location)
    }
}

/// The environment variables credentials come from, as every AWS client reads them: static keys,
/// or a web identity / container role. With none of them, object_store asks the instance
/// metadata service (an EC2 instance's role).
const CREDENTIAL_VARIABLES: [&str; 8] = [
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN",
    "AWS_ROLE_SESSION_NAME",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
];

/// Blobs in an S3 bucket, read through a cache in the data directory.
pub struct S3Blobs {
    store: Arc<dyn ObjectStore>,
    /// The same client with short retries, for the start-up check.
    probe: Arc<dyn ObjectStore>,
    bucket: String,
    cache: PathBuf,
    tmp: PathBuf,
    /// `Some` until dropped: a runtime must not be dropped where blocking is not allowed (the
    /// last reference may go on a tokio worker), so `Drop` shuts it down in the background.
    runtime: Option<tokio::runtime::Runtime>,
}

impl S3Blobs {
    /// A client of `location`'s bucket with credentials from `env` (the AWS variables), caching
    /// under `data`. Sends nothing: [`S3Blobs::check`] does.
    pub fn open(location: &S3Location, env: impl Fn(&str) -> Option<String>, data: &Layout) -> io::Result<S3Blobs> {
        // reqwest's rustls takes the process's default provider: ring, as the rest of Kiln.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(&location.bucket)
            .with_region(&location.region);
        if let Some(endpoint) = &location.endpoint {
            builder = builder
                .with_endpoint(endpoint)
                .with_allow_http(endpoint.starts_with("http://"))
                .with_virtual_hosted_style_request(false);
        }
        for variable in CREDENTIAL_VARIABLES {
            if let Some(value) = env(variable).filter(|v| !v.is_empty()) {
                let key: AmazonS3ConfigKey = variable.to_ascii_lowercase().parse().map_err(io::Error::other)?;
                builder = builder.with_config(key, value);
            }
        }
        let failed = |e: object_store::Error| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("S3 bucket {}: {e}", location.bucket),
            )
        };
        let probe = builder
            .clone()
            .with_retry(RetryConfig {
                backoff: BackoffConfig::default(),
                max_retries: 2,
                retry_timeout: Duration::from_secs(10),
            })
            .build()
            .map_err(failed)?;
        let store = builder.build().map_err(failed)?;
        let cache = data.root.join("blob-cache");
        for kind in [BlobKind::Artifact, BlobKind::Result, BlobKind::SandboxState] {
            fs::create_dir_all(cache.join(prefix(kind)))?;
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("kiln-s3")
            .enable_all()
            .build()?;
        Ok(S3Blobs {
            store: Arc::new(store),
            probe: Arc::new(probe),
            bucket: location.bucket.clone(),
            cache,
            tmp: data.tmp(),
            runtime: Some(runtime),
        })
    }

    /// Lists a prefix of the bucket once: fails, saying why, when the endpoint, the bucket or the
    /// credentials are wrong.
    pub fn check(&self) -> io::Result<()> {
        let probe = self.probe.clone();
        let key = Key::from(prefix(BlobKind::Artifact));
        self.run(async move { probe.list_with_delimiter(Some(&key)).await })?
            .map(drop)
            .map_err(|e| self.error("artifacts/ (listing)", e))
    }

    /// Runs `work` on this store's runtime and waits for it.
    fn run<T: Send + 'static>(&self, work: impl Future<Output = T> + Send + 'static) -> io::Result<T> {
        let (done, result) = std::sync::mpsc::sync_channel(1);
        let runtime = self.runtime.as_ref().expect("the runtime lives until drop");
        runtime.spawn(async move {
            let _ = done.send(work.await);
        });
        result
            .recv()
            .map_err(|_| io::Error::other("the S3 client's runtime stopped before answering"))
    }

    fn error(&self, key: &str, e: object_store::Error) -> io::Error {
        let kind = match e {
            object_store::Error::NotFound { .. } => io::ErrorKind::NotFound,
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, format!("S3 bucket {}, key {key}: {e}", self.bucket))
    }

    fn cached(&self, kind: BlobKind, digest: &Digest) -> PathBuf {
        self.cache.join(prefix(kind)).join(digest.hex())
    }

    /// Downloads `kind/digest` into a new temp file, checked against `digest` where its kind
    /// allows, synced, and returns its path (the caller renames or removes it).
    fn download(&self, kind: BlobKind, digest: &Digest) -> io::Result<PathBuf> {
        let key = key(kind, digest);
        let tmp = self.tmp.join(format!("{:016x}.s3.tmp", rand::random::<u64>()));
        let (store, path, dest) = (self.store.clone(), Key::from(key.as_str()), tmp.clone());
        // The body is written as it arrives, on this store's own workers: a local file write
        // is short next to the network read it follows.
        let downloaded = self.run(async move {
            let fetched = store.get(&path).await.map_err(Fetch::Store)?;
            let mut file = File::create_new(&dest).map_err(Fetch::Io)?;
            let mut sha = Sha256::new();
            let mut body = fetched.into_stream();
            while let Some(piece) = body.next().await {
                let piece = piece.map_err(Fetch::Store)?;
                sha.update(&piece);
                file.write_all(&piece).map_err(Fetch::Io)?;
            }
            file.sync_all().map_err(Fetch::Io)?;
            Ok::<_, Fetch>(hex::encode(sha.finalize()))
        })?;
        let sha = match downloaded {
            Ok(sha) => sha,
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return Err(match e {
                    Fetch::Store(e) => self.error(&key, e),
                    Fetch::Io(e) => {
                        io::Error::new(e.kind(), format!("caching S3 object {key} in {}: {e}", tmp.display()))
                    }
                });
            }
        };
        if kind.content_addressed() && sha != digest.hex() {
            let _ = fs::remove_file(&tmp);
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "S3 bucket {}, key {key}: the store returned bytes whose SHA-256 is {sha}, not the digest {}: refused",
                    self.bucket,
                    digest.hex()
                ),
            ));
        }
        Ok(tmp)
    }

    /// Keeps `bytes` in the cache (what this node put, it will likely read): best effort.
    fn keep(&self, kind: BlobKind, digest: &Digest, bytes: &[u8]) {
        if !kind.content_addressed() || self.cached(kind, digest).exists() {
            return;
        }
        if let Err(e) = super::local::write_atomic(&self.tmp, &self.cached(kind, digest), bytes) {
            tracing::warn!(digest = digest.hex(), error = %e, "could not cache a blob just uploaded");
        }
    }
}

/// Why a download failed: the store, or the local file.
enum Fetch {
    Store(object_store::Error),
    Io(io::Error),
}

impl Drop for S3Blobs {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// A kind's prefix in the bucket and directory in the cache: LocalBlobs' directory names.
fn prefix(kind: BlobKind) -> &'static str {
    match kind {
        BlobKind::Artifact => "artifacts",
        BlobKind::Result => "results",
        BlobKind::SandboxState => "sandboxes",
        BlobKind::SandboxChunk => "sandboxes/chunks",
        BlobKind::Compiled => "compiled",
    }
}

fn key(kind: BlobKind, digest: &Digest) -> String {
    format!("{}/{}", prefix(kind), digest.hex())
}

impl Blobs for S3Blobs {
    fn put(&self, kind: BlobKind, digest: &Digest, bytes: &[u8]) -> io::Result<()> {
        self.put_all(&[(kind, digest, bytes)])
    }

    /// Uploads up to 16 at once; returns when the store acknowledged all of them.
    fn put_all(&self, blobs: &[(BlobKind, &Digest, &[u8])]) -> io::Result<()> {
        const AT_ONCE: usize = 16;
        let uploads: Vec<_> = blobs
            .iter()
            .map(|(kind, digest, bytes)| {
                let (store, key) = (self.store.clone(), key(*kind, digest));
                // A copy: the request outlives this borrow on the store's runtime.
                let payload = PutPayload::from(bytes.to_vec());
                async move {
                    let put = store.put(&Key::from(key.as_str()), payload).await;
                    (key, put)
                }
            })
            .collect();
        let results = self.run(async move {
            futures_util::stream::iter(uploads)
                .buffer_unordered(AT_ONCE)
                .collect::<Vec<_>>()
                .await
        })?;
        for (key, put) in results {
            put.map_err(|e| self.error(&key, e))?;
        }
        for (kind, digest, bytes) in blobs {
            self.keep(*kind, digest, bytes);
        }
        Ok(())
    }

    fn get(&self, kind: BlobKind, digest: &Digest) -> io::Result<Vec<u8>> {
        let mut bytes = Vec::new();
        io::Read::read_to_end(&mut self.open(kind, digest)?, &mut bytes)?;
        Ok(bytes)
    }

    fn open(&self, kind: BlobKind, digest: &Digest) -> io::Result<File> {
        if !kind.content_addressed() {
            // Not cached (unchecked here): read once from a file gone with its handle.
            let tmp = self.download(kind, digest)?;
            let file = File::open(&tmp);
            let _ = fs::remove_file(&tmp);
            return file;
        }
        let cached = self.cached(kind, digest);
        match File::open(&cached) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            opened => return opened,
        }
        let tmp = self.download(kind, digest)?;
        if let Err(e) = fs::rename(&tmp, &cached) {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        File::open(&cached)
    }

    fn exists(&self, kind: BlobKind, digest: &Digest) -> bool {
        let (store, key) = (self.store.clone(), key(kind, digest));
        let path = Key::from(key.as_str());
        match self.run(async move { store.head(&path).await }) {
            Ok(Ok(_)) => true,
            Ok(Err(object_store::Error::NotFound { .. })) => false,
            Ok(Err(e)) => {
                tracing::warn!(error = %self.error(&key, e), "could not tell whether a blob exists: taken as missing");
                false
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not tell whether a blob exists: taken as missing");
                false
            }
        }
    }

    fn remove(&self, kind: BlobKind, digest: &Digest) -> io::Result<()> {
        let (store, key) = (self.store.clone(), key(kind, digest));
        let path = Key::from(key.as_str());
        match self.run(async move { store.delete(&path).await })? {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(self.error(&key, e)),
        }
        match fs::remove_file(self.cached(kind, digest)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    fn list(&self, kind: BlobKind) -> io::Result<Vec<Digest>> {
        let store = self.store.clone();
        let listed = self.run(async move {
            let prefix = Key::from(prefix(kind));
            store.list(Some(&prefix)).collect::<Vec<_>>().await
        })?;
        let mut digests = Vec::new();
        for object in listed {
            let object = object.map_err(|e| self.error(&format!("{}/ (listing)", prefix(kind)), e))?;
            // Listing is recursive: `sandboxes/` also holds `sandboxes/chunks/…`, which is not
            // `sandboxes/<hex>`.
            let name = object
                .location
                .as_ref()
                .strip_prefix(prefix(kind))
                .and_then(|n| n.strip_prefix('/'));
            if let Some(digest) = name.and_then(Digest::parse) {
                digests.push(digest);
            }
        }
        Ok(digests)
    }

    fn remote(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn urls_parse_with_defaults_and_unknown_keys_are_refused() {
        let plain = S3Location::parse("s3://kiln-blobs").unwrap();
        assert_eq!(
            plain,
            S3Location {
                bucket: "kiln-blobs".into(),
                endpoint: None,
                region: "us-east-1".into()
            }
        );
        let local = S3Location::parse("s3://b.1?endpoint=http://127.0.0.1:9000/&region=eu-west-3").unwrap();
        assert_eq!(local.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!(local.region, "eu-west-3");
        for (url, says) in [
            ("s3://bucket?endpont=http://x", "unknown parameter `endpont`"),
            (
                "s3://bucket?endpoint=127.0.0.1:9000",
                "must be an http:// or https:// URL",
            ),
            ("s3://bucket/prefix", "not a bucket name"),
            ("s3://Bucket", "not a bucket name"),
            ("s3://?region=x", "not a bucket name"),
            ("s3://bucket?region=", "region is empty"),
            ("file:///x", "not an s3:// URL"),
        ] {
            let error = S3Location::parse(url).unwrap_err();
            assert!(error.contains(says), "{url}: {error}");
        }
    }

    /// The test server, a store on it caching in `data`, and a second client of the same bucket
    /// that writes behind the store's back.
    fn on_test_server(data: &Path) -> (kiln_testkit::s3::S3Server, S3Blobs, Arc<dyn ObjectStore>) {
        let server = kiln_testkit::s3::S3Server::start().expect("the test S3 server starts");
        let layout = Layout::new(data.to_path_buf());
        layout.prepare().unwrap();
        let location = S3Location::parse(&server.url()).unwrap();
        let env = |name: &str| server.env().into_iter().find(|(k, _)| *k == name).map(|(_, v)| v);
        let blobs = S3Blobs::open(&location, env, &layout).unwrap();
        blobs.check().unwrap();
        let raw = blobs.store.clone();
        (server, blobs, raw)
    }

    #[test]
    fn blobs_round_trip_through_the_bucket_and_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let (server, blobs, _) = on_test_server(&dir.path().join("a"));
        let (a, r) = (Digest::of(b"artifact"), Digest::of(b"result"));
        assert!(!blobs.exists(BlobKind::Artifact, &a));
        blobs.put(BlobKind::Artifact, &a, b"artifact").unwrap();
        blobs.put(BlobKind::Result, &r, b"result").unwrap();
        let chunk = Digest::scoped("f", b"chunk");
        blobs.put_all(&[(BlobKind::SandboxChunk, &chunk, b"chunk")]).unwrap();
        assert!(blobs.exists(BlobKind::Artifact, &a));
        assert!(!blobs.exists(BlobKind::Result, &a), "kinds do not share a namespace");
        assert_eq!(blobs.list(BlobKind::Artifact).unwrap(), vec![a.clone()]);
        assert_eq!(blobs.list(BlobKind::Result).unwrap(), vec![r.clone()]);
        assert_eq!(
            blobs.list(BlobKind::SandboxState).unwrap(),
            vec![],
            "chunks are not states"
        );
        assert_eq!(blobs.list(BlobKind::SandboxChunk).unwrap(), vec![chunk.clone()]);
        assert!(
            server.object_path(&format!("artifacts/{}", a.hex())).exists(),
            "the key is <kind>/<hex>"
        );

        // Another node, with nothing cached, reads them from the bucket.
        let other = S3Blobs::open(
            &S3Location::parse(&server.url()).unwrap(),
            |name| server.env().into_iter().find(|(k, _)| *k == name).map(|(_, v)| v),
            &{
                let layout = Layout::new(dir.path().join("b"));
                layout.prepare().unwrap();
                layout
            },
        )
        .unwrap();
        assert!(!other.cached(BlobKind::Artifact, &a).exists());
        assert_eq!(other.get(BlobKind::Artifact, &a).unwrap(), b"artifact");
        assert!(other.cached(BlobKind::Artifact, &a).exists(), "kept in its cache");
        assert_eq!(other.get(BlobKind::SandboxChunk, &chunk).unwrap(), b"chunk");
        let mut streamed = String::new();
        io::Read::read_to_string(&mut other.open(BlobKind::Result, &r).unwrap(), &mut streamed).unwrap();
        assert_eq!(streamed, "result");

        other.remove(BlobKind::Artifact, &a).unwrap();
        other.remove(BlobKind::Artifact, &a).unwrap();
        assert!(!blobs.exists(BlobKind::Artifact, &a));
        assert!(
            !other.cached(BlobKind::Artifact, &a).exists(),
            "gone from the cache too"
        );
        let missing = other.get(BlobKind::Result, &a).unwrap_err();
        assert_eq!(missing.kind(), io::ErrorKind::NotFound, "{missing}");
        assert!(
            missing.to_string().contains(&format!("results/{}", a.hex())),
            "{missing}"
        );
        assert_eq!(
            fs::read_dir(dir.path().join("b/tmp")).unwrap().count(),
            0,
            "no temp file left"
        );
    }

    #[test]
    fn wrong_bytes_from_the_store_are_refused_and_not_cached() {
        let dir = tempfile::tempdir().unwrap();
        let (_server, blobs, raw) = on_test_server(dir.path());
        let digest = Digest::of(b"the real artifact");
        let key = Key::from(format!("artifacts/{}", digest.hex()).as_str());
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime
            .block_on(raw.put(&key, PutPayload::from_static(b"something else")))
            .unwrap();
        for error in [
            blobs.get(BlobKind::Artifact, &digest).unwrap_err(),
            blobs.open(BlobKind::Artifact, &digest).unwrap_err(),
        ] {
            assert_eq!(error.kind(), io::ErrorKind::InvalidData);
            assert!(error.to_string().contains(digest.hex()), "{error}");
        }
        assert!(!blobs.cached(BlobKind::Artifact, &digest).exists());
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);

        // Put again, the right bytes replace the wrong ones.
        blobs.put(BlobKind::Artifact, &digest, b"the real artifact").unwrap();
        fs::remove_file(blobs.cached(BlobKind::Artifact, &digest)).unwrap();
        assert_eq!(blobs.get(BlobKind::Artifact, &digest).unwrap(), b"the real artifact");
    }

    #[test]
    fn the_check_fails_clearly_on_wrong_credentials_or_no_server() {
        let dir = tempfile::tempdir().unwrap();
        let server = kiln_testkit::s3::S3Server::start().unwrap();
        let layout = Layout::new(dir.path().to_path_buf());
        layout.prepare().unwrap();
        let location = S3Location::parse(&server.url()).unwrap();
        let wrong = |name: &str| match name {
            "AWS_ACCESS_KEY_ID" => Some(server.access_key.clone()),
            "AWS_SECRET_ACCESS_KEY" => Some("not-the-secret".to_owned()),
            _ => None,
        };
        let error = S3Blobs::open(&location, wrong, &layout).unwrap().check().unwrap_err();
        assert!(
            error.to_string().contains(&format!("S3 bucket {}", server.bucket)),
            "{error}"
        );

        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let nowhere = S3Location {
            endpoint: Some(format!("http://{closed}")),
            ..location
        };
        let started = std::time::Instant::now();
        let env = |name: &str| server.env().into_iter().find(|(k, _)| *k == name).map(|(_, v)| v);
        let error = S3Blobs::open(&nowhere, env, &layout).unwrap().check().unwrap_err();
        assert!(
            error.to_string().contains(&format!("S3 bucket {}", server.bucket)),
            "{error}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "took {:?}",
            started.elapsed()
        );
    }
}
