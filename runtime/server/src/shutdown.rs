//! The process's stop signal: SIGINT (Ctrl-C) or SIGTERM (service managers, `kill`).

use tokio::signal::unix::{signal, SignalKind};

pub async fn signal_received() {
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing a SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}
