//! The naive serverless design ("Bad Lambda"): a process per request. Each request's body is the
//! child's stdin and the child's stdout is the answer, the same contract as a Kiln function, on the
//! same server stack as `bare-hyper`. `run.sh` serves `/bin/cat` (a native process per request)
//! and `wasmtime run` of the trivial guest (a Wasm runtime started per request) with it.
//!
//! Usage: fork-exec ADDR COMMAND [ARGS...]
//! Prints `fork-exec listening on http://ADDR` on stderr once bound (ADDR may use port 0).

use std::process::Stdio;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use tokio::io::AsyncWriteExt;

async fn run_child(command: &[String], input: Bytes) -> std::io::Result<(bool, Vec<u8>)> {
    let mut child = tokio::process::Command::new(&command[0])
        .args(&command[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let mut stdin = child.stdin.take().expect("stdin is piped");
    // A child that exits without reading its input closes the pipe: that is not an error here.
    let feed = async move {
        let _ = stdin.write_all(&input).await;
    };
    let (_, output) = tokio::join!(feed, child.wait_with_output());
    let output = output?;
    Ok((output.status.success(), output.stdout))
}

async fn handle(command: Arc<Vec<String>>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let input = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let (status, body) = match run_child(&command, input).await {
        Ok((true, stdout)) => (StatusCode::OK, Bytes::from(stdout)),
        Ok((false, _)) => (StatusCode::INTERNAL_SERVER_ERROR, Bytes::from_static(b"child failed\n")),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, Bytes::from(format!("spawn: {e}\n"))),
    };
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(addr), command) = (args.next(), args.collect::<Vec<_>>()) else {
        eprintln!("usage: fork-exec ADDR COMMAND [ARGS...]");
        std::process::exit(2);
    };
    if command.is_empty() {
        eprintln!("usage: fork-exec ADDR COMMAND [ARGS...]");
        std::process::exit(2);
    }
    let command = Arc::new(command);
    kiln_bench::serve::serve("fork-exec", &addr, move |req| handle(command.clone(), req)).await;
}
