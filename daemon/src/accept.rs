//! The accept loop the control socket and the metrics endpoint share: a bounded number of
//! connections at once, a back-off on accept errors, and a stop on shutdown.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{watch, Semaphore};

/// A listener whose connections [`serve_bounded`] accepts.
pub trait Accept {
    type Stream: Send + 'static;
    fn accept_stream(&self) -> impl Future<Output = io::Result<Self::Stream>> + Send;
}

impl Accept for UnixListener {
    type Stream = UnixStream;
    async fn accept_stream(&self) -> io::Result<UnixStream> {
        self.accept().await.map(|(stream, _)| stream)
    }
}

impl Accept for TcpListener {
    type Stream = TcpStream;
    async fn accept_stream(&self) -> io::Result<TcpStream> {
        self.accept().await.map(|(stream, _)| stream)
    }
}

/// Accepts connections on `listener` until `shutdown` becomes true (or its sender is dropped),
/// running `handle` on each in its own task, at most `max_connections` at once; the others
/// wait in the kernel's accept queue. `what` names the listener in logs.
pub async fn serve_bounded<L, H, F>(
    listener: L,
    max_connections: usize,
    what: &'static str,
    mut shutdown: watch::Receiver<bool>,
    handle: H,
) where
    L: Accept,
    H: Fn(L::Stream, watch::Receiver<bool>) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let connections = Arc::new(Semaphore::new(max_connections));
    loop {
        let permit = tokio::select! {
            permit = connections.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                // The semaphore is never closed; stop rather than spin if it ever is.
                Err(_) => return,
            },
            _ = stop_requested(&mut shutdown) => return,
        };
        let stream = tokio::select! {
            accepted = listener.accept_stream() => match accepted {
                Ok(stream) => stream,
                Err(error) => {
                    // Typically EMFILE; back off instead of spinning on the error.
                    tracing::warn!(%error, "{what}: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop_requested(&mut shutdown) => return,
        };
        let connection = handle(stream, shutdown.clone());
        tokio::spawn(async move {
            let _permit = permit;
            connection.await;
        });
    }
}

/// Resolves once shutdown is requested, or once nobody can request it any more.
pub async fn stop_requested(shutdown: &mut watch::Receiver<bool>) {
    // The returned guard is not Send; dropping it here keeps the caller's future Send.
    let _ = shutdown.wait_for(|stop| *stop).await;
}
