//! A throwaway S3-compatible server for tests: s3s over a temporary directory (s3s-fs), with one
//! access key (s3s's `SimpleAuth`, so requests are really signed and checked) and one bucket,
//! served on 127.0.0.1 by its own thread and tokio runtime. Dropping the handle stops the server
//! and removes the directory.
//!
//! Objects are plain files, `<dir>/<bucket>/<key>`: a test may look at them, or damage one.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::thread::JoinHandle;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;

/// A running server with its bucket, stopped when dropped.
pub struct S3Server {
    pub bucket: String,
    pub access_key: String,
    pub secret_key: String,
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    dir: tempfile::TempDir,
}

impl S3Server {
    /// Starts a server on a free loopback port with the bucket `kiln-test` created; `Err` says
    /// what failed.
    pub fn start() -> Result<S3Server, String> {
        let dir = tempfile::tempdir().map_err(|e| format!("a temporary directory: {e}"))?;
        let bucket = "kiln-test".to_owned();
        // s3s-fs keeps a bucket as a directory of its root.
        std::fs::create_dir(dir.path().join(&bucket)).map_err(|e| format!("creating the bucket: {e}"))?;
        let access_key = format!("AKIDKILN{:08X}", random() as u32);
        let secret_key = format!("kiln-test-secret-{:016x}", random());
        let filesystem = s3s_fs::FileSystem::new(dir.path()).map_err(|e| format!("s3s-fs: {e:?}"))?;
        let service = {
            let mut builder = S3ServiceBuilder::new(filesystem);
            builder.set_auth(SimpleAuth::from_single(access_key.clone(), secret_key.clone()));
            builder.build()
        };
        // Bound here, so the port accepts connections (they queue) before the thread runs.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| format!("binding: {e}"))?;
        let addr: SocketAddr = listener.local_addr().map_err(|e| e.to_string())?;
        listener.set_nonblocking(true).map_err(|e| e.to_string())?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("a tokio runtime: {e}"))?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("kiln-test-s3".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener).expect("a tokio listener");
                    let http = ConnBuilder::new(TokioExecutor::new());
                    let mut stopped = std::pin::pin!(stopped);
                    loop {
                        let socket = tokio::select! {
                            accepted = listener.accept() => match accepted {
                                Ok((socket, _)) => socket,
                                Err(_) => continue,
                            },
                            _ = &mut stopped => break,
                        };
                        let connection = http
                            .serve_connection(TokioIo::new(socket), service.clone())
                            .into_owned();
                        tokio::spawn(async move {
                            let _ = connection.await;
                        });
                    }
                });
                // Dropping the runtime here ends the connections still open.
            })
            .map_err(|e| format!("a server thread: {e}"))?;
        Ok(S3Server {
            bucket,
            access_key,
            secret_key,
            endpoint: format!("http://{addr}"),
            stop: Some(stop),
            thread: Some(thread),
            dir,
        })
    }

    /// The `--blob-store` URL of the bucket.
    pub fn url(&self) -> String {
        format!("s3://{}?endpoint={}&region=us-east-1", self.bucket, self.endpoint)
    }

    /// The environment variables that give a client this server's credentials.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", self.access_key.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret_key.clone()),
        ]
    }

    /// The file that holds object `key` of the bucket.
    pub fn object_path(&self, key: &str) -> PathBuf {
        self.dir.path().join(&self.bucket).join(key)
    }
}

/// A little randomness without a dependency (std seeds every `RandomState` afresh): keys differ
/// between servers and runs.
fn random() -> u64 {
    use std::hash::BuildHasher;
    std::collections::hash_map::RandomState::new().hash_one(0u8)
}

impl Drop for S3Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        // `dir` goes after this, with the server already stopped.
    }
}
